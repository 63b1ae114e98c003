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

from minirbt import stages  # noqa: E402
from minirbt.cli import OVERWRITE_HELP, ArgumentParser, run  # noqa: E402
from minirbt.modeling import (  # noqa: E402
    CONFIG_NAMES,
    MLM_HEAD_CHOICES,
    check_model_folder,
    config_path,
    init_from_teacher,
    load_config,
    load_mlm,
    parse_layer_map,
    resolve_model,
    save_model_folder,
)


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
    args.teacher = resolve_model(args.teacher, "--teacher")  # a folder or a Hugging Face model id
    check_model_folder(args.teacher, "teacher")
    config = load_config(args.student_config)
    teacher_config = load_config(Path(args.teacher) / "config.json")
    layers = parse_layer_map(args.layer_map, teacher_config.num_hidden_layers, config.num_hidden_layers)
    request = {"settings": {"student_config": config.to_diff_dict(), "layers": layers, "mlm_head": args.mlm_head},
               "inputs": {"teacher": stages.input_entry(args.teacher, stages.model_fingerprint(args.teacher))}}
    inputs = [("--teacher", args.teacher)]
    if Path(args.student_config).is_file():
        inputs.append(("--student_config", config_path(args.student_config)))
    claim = stages.claim(stages.MODEL, args.output, request, flag="--output", inputs=inputs,
                         overwrite=args.overwrite_output)
    if claim.state == "done":
        print(f"{args.output}: teacher assistant up to date (same teacher, config and layers), skipped")
        return
    student, layers = init_from_teacher(load_mlm(args.teacher, require_head=args.mlm_head == "copy"), config,
                                        args.layer_map, args.mlm_head)
    save_model_folder(student, args.teacher, args.output, replace=True, request=request)
    print(f"{args.output}: {student.config.num_hidden_layers} layers from teacher layers {layers}")


if __name__ == "__main__":
    run(main)
