"""Stage 4: MLM knowledge distillation, teacher -> student (one stage of the recipe).

    python pretraining/train.py --teacher pretrained_model_path/RoBERTa-wwm-ext \
        --student_init outputs/rbt6_init --dataset dataset/cached --output_dir outputs/rbt6 \
        --matches L12_L6_hidden_mse --temperature 8 --bf16
    torchrun --nproc_per_node 8 pretraining/train.py ...      # several GPUs (DDP)

See minirbt/trainer.py for the loop and minirbt/matches.py for the match format
and presets. ``--resume`` continues from the newest checkpoint in --output_dir.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirbt.cli import parse, run  # noqa: E402
from minirbt.trainer import DistillArguments, train  # noqa: E402


def main() -> None:
    (args,) = parse(DistillArguments)
    summary = train(args)
    if summary.get("skipped"):
        print(f"{args.output_dir}: done, skipped (a finished run with the same settings and inputs; "
              f"--overwrite_output to train it again)")
        return
    if summary["dev"]:
        print("dev: " + ", ".join(f"{k} {v:.4g}" for k, v in summary["dev"].items()))
    print(f"{args.output_dir}: student after {summary['steps']} steps ({summary['seconds']:.0f} s)")


if __name__ == "__main__":
    run(main)
