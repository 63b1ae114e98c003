"""Turn a raw state dict (MiniRBT/TextBrewer ``gs{step}.pkl``, a ``.bin``/``.pt``) into a model folder.

    python scripts/convert_checkpoint.py --checkpoint saved_models/gs100000.pkl --config minirbt_h256 \
        --vocab pretrained_model_path/RoBERTa-wwm-ext --output outputs/minirbt_h256_from_pkl

The file is read with ``torch.load(weights_only=True)``: plain tensors only, a pickle
that would execute code is refused. ``module.`` prefixes (DDP) are stripped and bare
``BertModel`` keys are accepted; the result loads with ``BertModel.from_pretrained``.
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
    load_config,
    mlm_from_state_dict,
    read_state_dict,
    resolve_model,
    save_model_folder,
)
from minirbt.textio import CorpusError  # noqa: E402
from minirbt.tokenization import load_tokenizer  # noqa: E402


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="The .pkl / .bin / .pt / .safetensors state dict.")
    ap.add_argument("--config", required=True, help=f"The model's config: a JSON file or {', '.join(CONFIG_NAMES)}.")
    ap.add_argument("--vocab", required=True, help="A folder with the vocab.txt the model was trained with.")
    ap.add_argument("--output", required=True, help="Output model folder (written atomically).")
    ap.add_argument("--overwrite_output", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args()
    args.vocab = resolve_model(args.vocab, "--vocab")
    load_tokenizer(args.vocab)  # a clear error for a folder without a vocab
    config = load_config(args.config)
    if not Path(args.checkpoint).is_file():
        raise CorpusError(f"--checkpoint not found: {args.checkpoint}")
    request = {"settings": {"config": config.to_diff_dict()},
               "inputs": {"checkpoint": stages.input_entry(args.checkpoint, stages.file_fingerprint(args.checkpoint)),
                          "vocab": stages.input_entry(Path(args.vocab) / "vocab.txt",
                                                      stages.file_fingerprint(Path(args.vocab) / "vocab.txt"))}}
    claim = stages.claim(stages.MODEL, args.output, request, flag="--output", overwrite=args.overwrite_output,
                         inputs=[("--checkpoint", args.checkpoint), ("--vocab", args.vocab)])
    if claim.state == "done":
        print(f"{args.output}: up to date (same checkpoint, config and vocab), skipped")
        return
    model, head_missing = mlm_from_state_dict(read_state_dict(args.checkpoint), config, args.checkpoint)
    save_model_folder(model, args.vocab, args.output, replace=True, request=request)
    note = f" (no MLM head in the file: {', '.join(head_missing)} left as initialised)" if head_missing else ""
    print(f"{args.output}: model folder from {args.checkpoint}{note}")


if __name__ == "__main__":
    run(main)
