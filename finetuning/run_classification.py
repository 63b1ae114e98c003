"""Stage 5: fine-tune and score a model folder on a CLUE task (several seeds), or distil one.

    python finetuning/run_classification.py --task ocnli --model outputs/minirbt_h256 \
        --train_file ocnli/train.json --dev_file ocnli/dev.json --output_dir outputs/ft/ocnli --seeds 1,2,3
    # task distillation from a fine-tuned teacher, with Chinese data augmentation
    python finetuning/run_classification.py --task chnsenticorp --model outputs/minirbt_h256 \
        --teacher outputs/ft/chnsenticorp_teacher/best --augment 10 \
        --augment_mlm pretrained_model_path/RoBERTa-wwm-ext ...

Tasks and formats: ocnli / afqmc (JSON lines: sentence1, sentence2, label; OCNLI "-" rows
skipped and counted), tnews (CLUE JSON lines: sentence, label), lcqmc / bq (TSV
text_a<TAB>text_b<TAB>label), chnsenticorp (CSV "label,review" or TSV "label<TAB>text_a").
Writes OUTPUT_DIR/results.json (dev accuracy mean over seeds, per_seed, best; with a labelled
--test_file also each seed's best-on-dev model scored on test),
dev_predictions.jsonl (+ test_predictions.jsonl) and best/ (the best model folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirbt.classification import ClassificationArguments, run_classification  # noqa: E402
from minirbt.cli import parse, run  # noqa: E402


def main() -> None:
    (args,) = parse(ClassificationArguments)
    r = run_classification(args)
    seeds = ", ".join(f"{x['seed']}: {x['accuracy']:.4f}" for x in r["per_seed"])
    print(f"{r['task']}: accuracy {r['accuracy']:.4f} (mean of seeds {seeds}; best {r['best']:.4f}; "
          f"majority class {r['majority_class_accuracy']:.4f}) -> {args.output_dir}/results.json")
    if "test_accuracy" in r:
        print(f"{r['task']}: test accuracy {r['test_accuracy']:.4f} ± {r['test_std']:.4f} over seeds "
              f"({r['test_examples']} labelled test examples)")


if __name__ == "__main__":
    run(main)
