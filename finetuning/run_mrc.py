"""Stage 5: fine-tune and score a model folder on a CLUE task (several seeds), or distil one.

    python finetuning/run_mrc.py --task cmrc2018 --model outputs/minirbt_h256 \
        --train_file cmrc2018/train.json --dev_file cmrc2018/dev.json --output_dir outputs/ft/cmrc2018 \
        --max_seq_length 512 --doc_stride 128 --max_answer_length 30 --seeds 1,2,3

SQuAD-style JSON (CMRC 2018, DRCD); long contexts in sliding windows; n-best span
decoding mapped back to the context's characters; the official CMRC 2018 EM/F1.
Answers whose answer_start does not match the context are counted and left out of
training (they still count as gold answers for scoring). --teacher distils from a
fine-tuned reading-comprehension folder (soft CE on start and end logits). --test_file
writes test_predictions.json (and, when it has answers, each seed's best-on-dev model
is scored on it); --resume continues from the per-epoch checkpoints.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirbt.cli import parse, run  # noqa: E402
from minirbt.mrc import MRCArguments, run_mrc  # noqa: E402


def main() -> None:
    (args,) = parse(MRCArguments)
    r = run_mrc(args)
    print(f"{r['task']}: EM {r['em']:.2f} F1 {r['f1']:.2f} (mean over {len(r['per_seed'])} seeds; "
          f"{r['skipped_bad_answers']} bad answers skipped) -> {args.output_dir}/results.json")
    if "test_f1" in r:
        print(f"{r['task']}: test EM {r['test_em']:.2f} F1 {r['test_f1']:.2f} ({r['test_questions']} questions)")


if __name__ == "__main__":
    run(main)
