"""The demo's deployment rows: a fine-tuned student as it would be served, measured like the PyTorch rows.

For each student the recipe names (``[deploy] models``), its fine-tuned model (the best epoch of the first seed
at the chosen learning rate, the ``best/`` folder :mod:`minirbt.pipeline` keeps) is

* exported to ONNX with an int8 copy (``scripts/export_onnx.py``'s :func:`minirbt.export.export_folder`), and
* vocabulary-pruned to the demo's pretraining text (``scripts/prune_vocab.py``'s
  :func:`minirbt.vocab_prune.prune_folder`), then exported and quantised the same way.

Every variant is scored on the held-out sentiment test set with the fine-tuning script's own encoding and metric
(:class:`minirbt.deploy_eval.DevSet`), and timed on one fixed batch (median of repeats, this process's threads).
Sizes are the bytes of the weights file each runtime loads.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from minirbt.textio import CorpusError

BATCH, SEQ = 8, 128


def fixed_batch(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """BATCH x SEQ token ids valid in every variant's vocabulary (the pruned one is the smallest)."""
    ids = torch.randint(100, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


@torch.inference_mode()
def latency_ms(model, batch: dict[str, torch.Tensor], repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of one forward pass of ``model`` (PyTorch or :class:`minirbt.export.OnnxModel`)."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        model(**batch)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def deploy_student(key: str, best: Path, work: Path, test_file: Path, task: str, corpus: Path, max_seq_length: int,
                   repeats: int) -> list[dict]:
    """The rows of one fine-tuned student: PyTorch fp32, ONNX fp32, ONNX int8, pruned PyTorch fp32, pruned int8.
    Every step is skipped when its output is up to date (the export and pruning folders are claimed outputs)."""
    from minirbt.export import INT8_NAME, ONNX_NAME, OnnxModel, export_folder, load_task_model
    from minirbt.vocab_prune import prune_folder

    if not (best / "config.json").is_file():
        raise CorpusError(f"{best}: no fine-tuned model to deploy (the fine-tuning stage did not keep one)")
    common = {"task": "classification", "int8": True, "dev_file": str(test_file), "dev_task": task,
              "max_seq_length": max_seq_length}
    full = export_folder(str(best), str(work / "onnx"), **common)
    pruning = prune_folder(str(best), str(corpus), str(work / "pruned"))
    pruned = export_folder(str(work / "pruned"), str(work / "pruned_onnx"), **common)
    batch = fixed_batch(pruning["vocab_after"])
    variants = [
        ("PyTorch fp32", load_task_model(best, "classification"), best / "model.safetensors", full, "torch_fp32",
         pruning["vocab_before"]),
        ("ONNX fp32", OnnxModel(work / "onnx" / ONNX_NAME), work / "onnx" / ONNX_NAME, full, "onnx_fp32",
         pruning["vocab_before"]),
        ("ONNX int8", OnnxModel(work / "onnx" / INT8_NAME), work / "onnx" / INT8_NAME, full, "onnx_int8",
         pruning["vocab_before"]),
        ("pruned vocab, PyTorch fp32", load_task_model(work / "pruned", "classification"),
         work / "pruned" / "model.safetensors", pruned, "torch_fp32", pruning["vocab_after"]),
        ("pruned vocab, ONNX int8", OnnxModel(work / "pruned_onnx" / INT8_NAME), work / "pruned_onnx" / INT8_NAME,
         pruned, "onnx_int8", pruning["vocab_after"]),
    ]
    reference = full["dev"]["scores"]["torch_fp32"]["accuracy"]
    rows = []
    for runtime, model, weights, report, score_key, vocab in variants:
        accuracy = report["dev"]["scores"][score_key]["accuracy"]
        rows.append({"key": key, "runtime": runtime, "vocab": vocab, "bytes": weights.stat().st_size,
                     "latency_ms": latency_ms(model, batch, repeats), "test_accuracy": accuracy,
                     "change_points": 100 * (accuracy - reference), "int8": "int8" in runtime,
                     "test_examples": report["dev"]["examples"]})
    return rows


def deployment_findings(rows: list[dict], names: dict[str, str]) -> list[str]:
    """Plain statements: each int8 variant's accuracy change and speed against its own PyTorch fp32 model."""
    out = []
    for key in dict.fromkeys(r["key"] for r in rows):
        own = [r for r in rows if r["key"] == key]
        fp32 = own[0]
        for r in own:
            if r["int8"]:
                within = "within" if abs(r["change_points"]) <= 1.0 else "NOT within"
                out.append(f"{names.get(key, key)}, {r['runtime']}: test accuracy {100 * r['test_accuracy']:.2f}% vs "
                           f"{100 * fp32['test_accuracy']:.2f}% in PyTorch fp32 ({r['change_points']:+.2f} points, "
                           f"{within} 1 point), {fp32['latency_ms'] / r['latency_ms']:.1f}x faster, "
                           f"{fp32['bytes'] / r['bytes']:.1f}x smaller.")
    return out
