"""Stage 4: MLM knowledge distillation, teacher -> student (one stage of the recipe).

    python pretraining/train.py --teacher pretrained_model_path/RoBERTa-wwm-ext \
        --student_init outputs/rbt6_init --dataset dataset/cached --output_dir outputs/rbt6 \
        --matches L12_L6_hidden_mse --temperature 8 --bf16
    python pretraining/train.py --recipe minirbt --stage rbt6 --teacher ... --student_init ... \
        --dataset ... --output_dir ...      # the stage's settings from pretraining/recipes/minirbt.toml
    torchrun --nproc_per_node 8 pretraining/train.py ...      # several GPUs (DDP)
    python pretraining/train.py --teacher outputs/rbt6 --dataset dataset/cached --students students.json ...
        # several students from one teacher pass; students.json, one object per student:
        # [{"output_dir": "outputs/h256", "student_config": "minirbt_h256", "matches": ["L6_L6_hidden_mse_H256"]},
        #  {"output_dir": "outputs/h288", "student_config": "minirbt_h288", "matches": ["L6_L6_hidden_mse_H288"]}]

See minirbt/trainer.py for the loop, minirbt/distill.py for the loss and
minirbt/matches.py for the match format and presets. ``--resume`` continues from
the newest checkpoint in --output_dir.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirbt.cli import parse, run  # noqa: E402
from minirbt.pretrain_setup import read_students  # noqa: E402
from minirbt.recipe import train_defaults  # noqa: E402
from minirbt.textio import CorpusError  # noqa: E402
from minirbt.trainer import DistillArguments, summary_lines, train_students  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--args_json"]:  # written by minirbt.pipeline for a torchrun launch
        if len(argv) != 2:
            raise CorpusError("--args_json takes one file and no other flags")
        from minirbt.cli import parse_json

        (args,) = parse_json(DistillArguments, argv[1])
    else:
        (args,) = parse(DistillArguments, defaults=train_defaults(argv), argv=argv)
    students = read_students(args) if args.students else [args]
    for student, summary in zip(students, train_students(students)):
        for line in summary_lines(student.output_dir, summary):
            print(line)


if __name__ == "__main__":
    run(main)
