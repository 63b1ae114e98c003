"""Stage 5: sentence(-pair) classification on CLUE-style tasks (``finetuning/run_classification.py``).

The loop, checkpoints and task distillation are :mod:`minirbt.finetune`'s; this module reads the task,
encodes it, scores accuracy, and with ``--augment`` adds TinyBERT-style variants (:mod:`minirbt.augment`)
that the teacher labels.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from transformers import BertForSequenceClassification

from minirbt import finetune as ft
from minirbt import stages
from minirbt.cli import check_ranges
from minirbt.distill import classification_adaptor
from minirbt.tasks import LABELS, Example, read_classification
from minirbt.textio import CorpusError

EVAL_BATCH = 64


@dataclass
class ClassificationArguments(ft.CommonArguments):
    """run_classification.py: the common flags and data augmentation for task distillation."""

    augment: int = field(default=0, metadata={"help": "Augmented variants per training example (needs --teacher)."})
    augment_prob: float = field(default=0.4, metadata={"help": "Probability of replacing each word."})
    augment_mlm: str | None = field(default=None, metadata={"help": "MLM folder proposing words (default: --model)."})
    augment_candidates: int = field(default=15, metadata={"help": "Candidates per word (TinyBERT: 15)."})
    segmenter: str = field(default="jieba", metadata={"help": "Word segmenter for --augment: jieba or ltp."})
    ltp_model: str | None = field(default=None, metadata={"help": "LTP folder for --segmenter ltp."})

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self, at_least_1=("augment_candidates",), non_negative=("augment",),
                     probability=("augment_prob",))
        if self.segmenter not in ("jieba", "ltp"):
            raise CorpusError(f"--segmenter must be jieba or ltp, got {self.segmenter!r}")


def encode(tokenizer, examples: list[Example], max_len: int) -> list[dict]:
    enc = tokenizer([e.text_a for e in examples], [e.text_b for e in examples] if examples[0].text_b is not None
                    else None, truncation=True, max_length=max_len)
    return [{"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
             "label": -100 if e.label is None else e.label} for i, e in enumerate(examples)]


def _read(args: ClassificationArguments) -> tuple:
    """Train, dev and (optional) test examples with their read reports, checked against --max_unusable_share."""
    # with a teacher, rows without a gold label still teach (the teacher labels them)
    train_ex, train_rep = read_classification(args.task, args.train_file, keep_unlabelled=bool(args.teacher))
    train_rep.check(args.max_unusable_share, "training")
    dev_ex, dev_rep = read_classification(args.task, args.dev_file)
    dev_rep.check(args.max_unusable_share, "dev")
    test_ex, test_rep = read_classification(args.task, args.test_file, keep_unlabelled=True) if args.test_file \
        else (None, None)
    return train_ex, train_rep, dev_ex, dev_rep, test_ex, test_rep


def _augmented(args: ClassificationArguments, train_ex: list[Example], device) -> list[Example]:
    if not args.augment:
        return train_ex
    from minirbt.augment import augment_examples
    from minirbt.segmentation import make_segmenter

    seg = make_segmenter(args.segmenter, args.ltp_model)
    extra = augment_examples(train_ex, args.augment, args.augment_prob, args.augment_mlm or args.model, seg, 0,
                             args.augment_candidates, device, args.max_seq_length)
    print(f"augmentation: {len(extra)} new examples from {len(train_ex)}", flush=True)
    return train_ex + extra


def run_classification(args: ClassificationArguments) -> dict:
    if args.task not in LABELS:
        raise CorpusError(f"unknown classification task {args.task!r}: one of {', '.join(LABELS)}")
    ft.check_common(args)
    if not args.teacher and args.augment:
        raise CorpusError("--augment and --matches need --teacher (a fine-tuned teacher folder)")
    train_ex, train_rep, dev_ex, dev_rep, test_ex, test_rep = _read(args)
    claim, _ = ft.claim_output(args, stages.FINETUNE_RUN)
    if claim.state == "done":
        return ft.finished_results(args)
    train_ex, dev_ex, device, autocast, tokenizer = ft.prepare(args, train_ex, dev_ex, (train_rep, dev_rep, test_rep))
    n_labels = len(LABELS[args.task])
    attn = args.distill_config().attn_implementation
    attn_kw = {"attn_implementation": attn} if attn else {}
    teacher = None
    if args.teacher:
        teacher = ft.quiet_load(BertForSequenceClassification, args.teacher, **attn_kw).to(device).eval()
        if teacher.config.num_labels != n_labels:
            raise CorpusError(f"teacher {args.teacher} has {teacher.config.num_labels} labels, task {args.task} "
                              f"has {n_labels}: is it fine-tuned on this task?")
    train_ex = _augmented(args, train_ex, device)
    pad_id = tokenizer.pad_token_id
    dev_rows = encode(tokenizer, dev_ex, args.max_seq_length)
    test_rows = encode(tokenizer, test_ex, args.max_seq_length) if test_ex else None
    gold = np.array([e.label for e in dev_ex])
    test_gold = np.array([e.label for e in test_ex]) if test_ex and all(e.label is not None for e in test_ex) \
        else None
    teacher_dev = ft.predict(teacher, dev_rows, pad_id, EVAL_BATCH, device, autocast) if teacher else None

    def logits(model, rows):
        return ft.predict(model, rows, pad_id, EVAL_BATCH, device, autocast)

    def after_training(model, kl_before, record: dict) -> dict:
        fields = {}
        if teacher is not None:
            fields["kl_to_teacher"] = {"before": kl_before, "after": ft.kl(teacher_dev, logits(model, dev_rows))}
        if test_gold is not None:  # a labelled test file: score this seed's best-on-dev model on it
            fields["test_accuracy"] = float((logits(model, test_rows).argmax(-1) == test_gold).mean())
            print(f"seed {record['seed']}: test accuracy {fields['test_accuracy']:.4f} (epoch {record['best_epoch']})",
                  flush=True)
        return fields

    task = ft.TaskRun(
        BertForSequenceClassification, {"num_labels": n_labels, **attn_kw}, classification_adaptor,
        encode(tokenizer, train_ex, args.max_seq_length),
        score=lambda model: {"accuracy": float((logits(model, dev_rows).argmax(-1) == gold).mean())},
        metric="accuracy", recorded=("accuracy",), describe=lambda s: f"dev accuracy {s['accuracy']:.4f}",
        before_training=(lambda model: ft.kl(teacher_dev, logits(model, dev_rows))) if teacher is not None else None,
        after_training=after_training)
    t0 = time.perf_counter()
    per_seed = ft.fit_seeds(args, task, teacher, claim.state == "resume", device, autocast, pad_id)
    # the best seed's best epoch: predictions and the saved model
    best_record, model = ft.best_model(args, task, per_seed, device)
    labels = LABELS[args.task]
    out = Path(args.output_dir)
    ft.write_jsonl(out / "dev_predictions.jsonl", [{"id": e.guid, "label": labels[int(p)], "gold": labels[e.label]}
                                                for e, p in zip(dev_ex, logits(model, dev_rows).argmax(-1))])
    if test_rows:
        ft.write_jsonl(out / "test_predictions.jsonl", [{"id": e.guid, "label": labels[int(p)]}
                                                     for e, p in zip(test_ex, logits(model, test_rows).argmax(-1))])
    results = _results(args, per_seed, best_record["seed"], gold, test_gold, n_labels, len(train_ex), len(dev_ex),
                       (train_rep, dev_rep, test_rep), time.perf_counter() - t0)
    ft.finish_run(args, stages.FINETUNE_RUN, model, results)
    return results


def _results(args, per_seed: list[dict], best_seed: int, gold, test_gold, n_labels: int, n_train: int, n_dev: int,
             reports: tuple, seconds: float) -> dict:
    accs = [r["accuracy"] for r in per_seed]
    results = {"task": args.task, "metric": "accuracy", "accuracy": float(np.mean(accs)),
               "std": float(np.std(accs)), "per_seed": per_seed, "best": max(accs), "best_seed": best_seed,
               "majority_class_accuracy": float(np.bincount(gold, minlength=n_labels).max() / len(gold)),
               "train_examples": n_train, "dev_examples": n_dev,
               "read": {name: rep.as_dict() for name, rep in zip(("train", "dev", "test"), reports)
                        if rep is not None},
               "seconds": seconds, "args": asdict(args)}
    if test_gold is not None:
        test_accs = [r["test_accuracy"] for r in per_seed]
        results |= {"test_accuracy": float(np.mean(test_accs)), "test_std": float(np.std(test_accs)),
                    "test_examples": len(test_gold),
                    "test_majority_class_accuracy": float(np.bincount(test_gold, minlength=n_labels).max()
                                                          / len(test_gold))}
    return results
