"""Stage 3: build the teacher assistant (e.g. RBT6) from the teacher's layers.

    python scripts/init_checkpoint_TA.py --teacher pretrained_model_path/RoBERTa-wwm-ext \
        --student_config rbt6 --layer_map uniform --output outputs/rbt6_init

Copies the embeddings (+ LayerNorm), the chosen teacher layers and (``--mlm_head copy``)
the MLM head's transform and decoder bias (the decoder stays tied to the embeddings)
into a BertForMaskedLM of the student config, and writes a complete model folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirbt.cli import OVERWRITE_HELP, ArgumentParser, run  # noqa: E402
from minirbt.modeling import CONFIG_NAMES, MLM_HEAD_CHOICES, build_teacher_assistant  # noqa: E402


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="Teacher model folder (config.json, weights, vocab.txt).")
    ap.add_argument("--student_config", default="rbt6",
                    help=f"JSON file, or a shipped config: {', '.join(CONFIG_NAMES)} (default: rbt6).")
    ap.add_argument("--layer_map", default="uniform",
                    help="Which teacher layers (0-based) become the student's: 'uniform' (default: spread over "
                         "the depth, round(i*(LT-1)/(LS-1)); for 12->6 that is 0,2,4,7,9,11, the list MiniRBT's "
                         "released code uses), 'first' (layers 0..LS-1, as MiniRBT's README says), or a list "
                         "such as 0,2,4,7,9,11.")
    ap.add_argument("--output", required=True, help="Output model folder (written atomically).")
    ap.add_argument("--mlm_head", choices=MLM_HEAD_CHOICES, default="copy",
                    help="The student's MLM head transform and bias: 'copy' the teacher's (default) or leave them "
                         "'random' (MiniRBT's released code). The README gives the measured difference.")
    ap.add_argument("--overwrite_output", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args()
    print(build_teacher_assistant(args.teacher, args.student_config, args.output, args.layer_map, args.mlm_head,
                                  args.overwrite_output))


if __name__ == "__main__":
    run(main)
