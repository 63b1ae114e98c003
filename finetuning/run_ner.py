"""Stage 5: fine-tune and score a model folder on Chinese NER (several seeds), or distil one.

    python scripts/peoples_daily_ner.py --output data/peoples_daily_ner       # the embedded data set
    python finetuning/run_ner.py --task peoples_daily --model outputs/minirbt_h256 \
        --train_file data/peoples_daily_ner/train.txt --dev_file data/peoples_daily_ner/dev.txt \
        --test_file data/peoples_daily_ner/test.txt --output_dir outputs/ft/ner --seeds 1,2,3
    # task distillation from a fine-tuned NER teacher
    python finetuning/run_ner.py ... --teacher outputs/ft/ner_teacher/best --temperature 4

Format (MSRA NER, People's Daily 1998, Resume/Weibo NER, CoNLL-2003): one token and its tag per line
(BIO, BIOES or BMES), a blank line between sentences. The tags are the training file's; a dev or test tag it
never has is an error. Long sentences are cut into windows of --max_seq_length sub-tokens and put back together;
every token is scored once. Writes OUTPUT_DIR/results.json (entity-level F1/precision/recall in percent, mean
over seeds, per type, per seed, best; with --test_file each seed's best-on-dev model scored on test),
predictions_dev.txt / predictions_test.txt ("token gold predicted" lines) and best/ (the best model folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirbt.cli import parse, run  # noqa: E402
from minirbt.ner import NERArguments, run_ner  # noqa: E402


def main() -> None:
    (args,) = parse(NERArguments)
    r = run_ner(args)
    seeds = ", ".join(f"{x['seed']}: {x['f1']:.2f}" for x in r["per_seed"])
    print(f"{r['task']}: dev F1 {r['f1']:.2f} (P {r['precision']:.2f} R {r['recall']:.2f}; seeds {seeds}; best "
          f"{r['best']:.2f}) -> {args.output_dir}/results.json")
    if "test_f1" in r:
        types = ", ".join(f"{t} {s['f1']:.2f}" for t, s in r["test_per_type"].items())
        print(f"{r['task']}: test F1 {r['test_f1']:.2f} ± {r['test_std']:.2f} over seeds (P {r['test_precision']:.2f} "
              f"R {r['test_recall']:.2f}; best seed per type: {types})")


if __name__ == "__main__":
    run(main)
