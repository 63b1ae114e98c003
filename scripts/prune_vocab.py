"""Prune a model's vocabulary to the tokens a corpus uses (TextPruner's vocabulary pruning).

    python scripts/prune_vocab.py --model outputs/minirbt_h256 --corpus dataset/train/train_files \
        --output outputs/minirbt_h256_pruned [--min_count 1]

--model: any model folder the project writes (a pretrained student, a fine-tuned best/ folder)
or a Hugging Face id. --corpus: a text file, a folder of text files, or a dataset folder of
pretraining/my_datasets.py built with this model's vocabulary. Keeps the special tokens and every
token seen at least --min_count times, slices the embedding rows (and the tied MLM decoder),
writes vocab.txt to match; texts made only of kept tokens give the same outputs as before, an
unseen character becomes [UNK]. Prints and writes pruning_report.json (sizes before/after).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirbt.cli import OVERWRITE_HELP, ArgumentParser, run  # noqa: E402
from minirbt.vocab_prune import prune_folder, report_line  # noqa: E402


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Model folder or Hugging Face model id.")
    ap.add_argument("--corpus", required=True, help="Text file, folder of text files, or my_datasets.py dataset.")
    ap.add_argument("--output", required=True, help="Output model folder (written atomically; never an input).")
    ap.add_argument("--min_count", type=int, default=1, help="Keep tokens seen at least this often (default 1).")
    ap.add_argument("--overwrite_output", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args()
    print(report_line(prune_folder(args.model, args.corpus, args.output, args.min_count, args.overwrite_output),
                      args.output))


if __name__ == "__main__":
    run(main)
