"""Stage 5: Chinese NER, token classification (``finetuning/run_ner.py``).

Sentences (:mod:`minirbt.ner_data`) are encoded token by token: a character's label goes on its first
sub-token, and the prediction for a character is its first sub-token's. A sentence longer than the window is cut
into consecutive windows at token boundaries, and the windows' predictions are put back together, so every token
is scored exactly once. A token the tokenizer drops (a space, a control character) has no sub-token: it keeps its
gold tag and is scored with the prediction that continues its left neighbour's entity (``I-TYPE`` inside one, ``O``
outside); a token that becomes ``[UNK]`` is predicted like any other. Scores are seqeval's (entity level: exact
span and type, micro-averaged, BIO repaired the conlleval way), in percent. The loop, checkpoints and task
distillation (soft cross-entropy over the tag logits of every scored token) are :mod:`minirbt.finetune`'s.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BertForTokenClassification

from minirbt import finetune as ft
from minirbt import stages
from minirbt.distill import token_adaptor
from minirbt.ner_data import NERSentence, check_tags, entity_count, label_list, read_ner
from minirbt.textio import CorpusError, atomic_path

TASKS = ("msra", "peoples_daily", "conll")
EVAL_BATCH = 64


@dataclass
class NERArguments(ft.CommonArguments):
    """run_ner.py: the common fine-tuning flags. --max_seq_length is the window (sub-tokens incl. [CLS]/[SEP])."""


# ------------------------------------------------------------------ encoding: sentences -> windows
def encode(tokenizer, sentences: list[NERSentence], labels: list[str], max_len: int) -> list[dict]:
    """Windows of at most ``max_len`` sub-tokens ([CLS] ... [SEP]); each row knows its sentence and, for every
    position holding a token's first sub-token, that token's index (``positions``)."""
    label_id = {t: i for i, t in enumerate(labels)}
    room = max_len - 2
    rows = []
    for k, s in enumerate(sentences):
        pieces = tokenizer([s.tokens], is_split_into_words=True, add_special_tokens=False)
        per_token: list[list[int]] = [[] for _ in s.tokens]
        for position, w in enumerate(pieces.word_ids(0)):
            if w is not None:
                per_token[w].append(pieces["input_ids"][0][position])
        window: list[tuple[int, list[int]]] = []
        used = 0
        for i, ids in enumerate(per_token):
            ids = ids[:room]  # a word longer than the window keeps its first sub-tokens (its label is on the first)
            if used + len(ids) > room:
                rows.append(_row(tokenizer, k, window, s.tags, label_id))
                window, used = [], 0
            window.append((i, ids))
            used += len(ids)
        rows.append(_row(tokenizer, k, window, s.tags, label_id))
    return rows


def _row(tokenizer, sentence: int, window: list[tuple[int, list[int]]], tags: list[str],
         label_id: dict[str, int]) -> dict:
    ids, labels, positions = [tokenizer.cls_token_id], [-100], []
    for i, pieces in window:
        if pieces:
            positions.append((len(ids), i))
            labels += [label_id.get(tags[i], -100)] + [-100] * (len(pieces) - 1)
            ids += pieces
    ids.append(tokenizer.sep_token_id)
    labels.append(-100)
    return {"input_ids": ids, "token_type_ids": [0] * len(ids), "labels": labels, "sentence": sentence,
            "tokens": [i for i, _ in window], "positions": positions}


@torch.no_grad()
def position_logits(model, rows: list[dict], pad_id: int, device, autocast) -> np.ndarray:
    """Tag logits at every scored position of ``rows`` (a token's first sub-token), in row order: (N, tags)."""
    model.eval()
    out = []
    for start in range(0, len(rows), EVAL_BATCH):
        chunk = rows[start : start + EVAL_BATCH]
        b = ft.pad(chunk, pad_id)
        with autocast:
            logits = model(**{k: b[k].to(device) for k in ft.INPUT_KEYS}).logits.float()
        index = [(r, position) for r, row in enumerate(chunk) for position, _ in row["positions"]]
        if index:
            rows_i, cols_i = zip(*index)
            out.append(logits[list(rows_i), list(cols_i)].cpu().numpy())
    model.train()
    return np.concatenate(out) if out else np.zeros((0, model.config.num_labels), dtype=np.float32)


def predict_tags(model, rows: list[dict], sentences: list[NERSentence], labels: list[str], pad_id: int, device,
                 autocast) -> list[list[str]]:
    """Each sentence's predicted tags, windows merged; dropped tokens continue their left neighbour's entity."""
    best = iter(position_logits(model, rows, pad_id, device, autocast).argmax(-1).tolist())
    predicted: list[list[str | None]] = [[None] * len(s.tokens) for s in sentences]
    for row in rows:
        for _, i in row["positions"]:
            predicted[row["sentence"]][i] = labels[next(best)]
    for tags in predicted:
        for i, t in enumerate(tags):
            if t is None:
                left = tags[i - 1] if i else "O"
                tags[i] = "O" if left == "O" else f"I-{left[2:]}"
    return predicted


# ------------------------------------------------------------------ the metric
def _bio(tags: list[str]) -> list[str]:
    return [f"I-{t[2:]}" if t.startswith("M-") else t for t in tags]  # BMES's M is BIOES's I


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of every entity, read the way seqeval (conlleval) reads tags."""
    from seqeval.metrics.sequence_labeling import get_entities

    return get_entities(_bio(tags))


def score(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Entity-level precision, recall and F1 (percent), micro-averaged, and per type: seqeval's default mode."""
    from seqeval.metrics import classification_report

    report = classification_report([_bio(t) for t in gold], [_bio(t) for t in predicted], output_dict=True,
                                   zero_division=0)
    micro = report["micro avg"]

    def pct(d: dict) -> dict:
        return {"precision": 100 * float(d["precision"]), "recall": 100 * float(d["recall"]),
                "f1": 100 * float(d["f1-score"]), "support": int(d["support"])}

    per_type = {k: pct(v) for k, v in report.items() if not k.endswith(" avg")}
    return {**{k: v for k, v in pct(micro).items() if k != "support"}, "entities": int(micro["support"]),
            "per_type": per_type}


def write_predictions(path: Path, sentences: list[NERSentence], predicted: list[list[str]]) -> None:
    """``token gold predicted`` per line, a blank line between sentences (whitespace in a token shown as ␣)."""
    lines = []
    for s, tags in zip(sentences, predicted):
        lines += [f"{''.join('␣' if c.isspace() else c for c in tok)} {g} {p}"
                  for tok, g, p in zip(s.tokens, s.tags, tags)]
        lines.append("")
    with atomic_path(path, replace=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------ the run
def _read(args: NERArguments) -> tuple:
    train, train_rep = read_ner(args.train_file, "training")
    labels = label_list(train)
    dev, dev_rep = read_ner(args.dev_file, "dev")
    check_tags(dev, labels, args.dev_file)
    test, test_rep = (None, None)
    if args.test_file:
        test, test_rep = read_ner(args.test_file, "test")
        check_tags(test, labels, args.test_file)
    return labels, (train, dev, test), (train_rep, dev_rep, test_rep)


def run_ner(args: NERArguments) -> dict:
    if args.task not in TASKS:
        raise CorpusError(f"unknown NER task {args.task!r}: one of {', '.join(TASKS)} (all read the same "
                          f"one-token-per-line tag format)")
    ft.check_common(args)
    labels, (train_s, dev_s, test_s), reports = _read(args)
    claim, _ = ft.claim_output(args, stages.NER_RUN)
    if claim.state == "done":
        return ft.finished_results(args)
    train_s, dev_s, device, autocast, tokenizer = ft.prepare(args, train_s, dev_s, reports)
    for name, sents in (("train", train_s), ("dev", dev_s), ("test", test_s)):
        if sents:
            counts = entity_count(sents)
            print(f"{name}: {len(sents)} sentences, {sum(len(s.tokens) for s in sents)} tokens, entities "
                  + (", ".join(f"{t} {n}" for t, n in sorted(counts.items())) or "none"), flush=True)
    pad_id = tokenizer.pad_token_id
    attn = args.distill_config().attn_implementation
    load_kw = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
               "label2id": {t: i for i, t in enumerate(labels)}, **({"attn_implementation": attn} if attn else {})}
    teacher = None
    if args.teacher:
        teacher = ft.quiet_load(BertForTokenClassification, args.teacher,
                                **({"attn_implementation": attn} if attn else {})).to(device).eval()
        teacher_labels = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
        if teacher_labels != labels:
            raise CorpusError(f"teacher {args.teacher} predicts the tags {teacher_labels}, the training file has "
                              f"{labels}: is it fine-tuned on this data set?")
    rows = {name: encode(tokenizer, sents, labels, args.max_seq_length) if sents else None
            for name, sents in (("train", train_s), ("dev", dev_s), ("test", test_s))}
    # a training window whose every token the tokenizer drops (spaces only) has nothing to learn from; a batch of
    # such windows would average a loss over no position (NaN). Scoring keeps them (their tokens are scored).
    rows["train"] = [r for r in rows["train"] if r["positions"]]

    def scores(model, split: str, sents: list[NERSentence]) -> dict:
        return score([s.tags for s in sents], predict_tags(model, rows[split], sents, labels, pad_id, device,
                                                            autocast))

    teacher_dev = position_logits(teacher, rows["dev"], pad_id, device, autocast) if teacher else None

    def kl_to_teacher(model) -> float:
        return ft.kl(teacher_dev, position_logits(model, rows["dev"], pad_id, device, autocast))

    def after_training(model, kl_before, record: dict) -> dict:
        fields = {"kl_to_teacher": {"before": kl_before, "after": kl_to_teacher(model)}} if teacher else {}
        if test_s:
            s = scores(model, "test", test_s)
            print(f"seed {record['seed']}: test F1 {s['f1']:.2f} (P {s['precision']:.2f} R {s['recall']:.2f}; "
                  f"epoch {record['best_epoch']})", flush=True)
            fields |= {f"test_{k}": s[k] for k in ("f1", "precision", "recall", "per_type")}
        return fields

    task = ft.TaskRun(BertForTokenClassification, load_kw, token_adaptor, rows["train"],
                      score=lambda model: scores(model, "dev", dev_s), metric="f1",
                      recorded=("f1", "precision", "recall", "per_type"),
                      describe=lambda s: f"dev F1 {s['f1']:.2f} (P {s['precision']:.2f} R {s['recall']:.2f})",
                      before_training=kl_to_teacher if teacher else None, after_training=after_training)
    t0 = time.perf_counter()
    per_seed = ft.fit_seeds(args, task, teacher, claim.state == "resume", device, autocast, pad_id)
    best_record, model = ft.best_model(args, task, per_seed, device)
    out = Path(args.output_dir)
    for name, sents in (("dev", dev_s), ("test", test_s)):
        if sents:
            write_predictions(out / f"predictions_{name}.txt", sents,
                              predict_tags(model, rows[name], sents, labels, pad_id, device, autocast))
    results = _results(args, per_seed, best_record, labels, rows, reports, time.perf_counter() - t0)
    ft.finish_run(args, stages.NER_RUN, model, results)
    return results


def _results(args: NERArguments, per_seed: list[dict], best: dict, labels: list[str], rows: dict, reports: tuple,
             seconds: float) -> dict:
    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in per_seed]))

    results = {"task": args.task, "metric": "entity-level micro F1 (seqeval)", "f1": mean("f1"),
               "precision": mean("precision"), "recall": mean("recall"), "std": float(np.std([r["f1"] for r in
                                                                                              per_seed])),
               "per_type": best["per_type"], "per_seed": per_seed, "best": max(r["f1"] for r in per_seed),
               "best_seed": best["seed"], "labels": labels,
               "windows": {k: len(v) for k, v in rows.items() if v is not None},
               "read": {name: rep.as_dict() for name, rep in zip(("train", "dev", "test"), reports) if rep},
               "seconds": seconds, "args": asdict(args)}
    if "test_f1" in per_seed[0]:
        results |= {"test_f1": mean("test_f1"), "test_precision": mean("test_precision"),
                    "test_recall": mean("test_recall"), "test_std": float(np.std([r["test_f1"] for r in per_seed])),
                    "test_per_type": best["test_per_type"]}
    return results
