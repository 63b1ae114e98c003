"""Stage 5: span-extraction reading comprehension, CMRC 2018 and DRCD (``finetuning/run_mrc.py``).

SQuAD-style JSON; long contexts in sliding windows (``--doc_stride`` tokens of overlap);
n-best span decoding mapped back to the context's characters; the official CMRC 2018
EM/F1. The loop, checkpoints (``--resume``) and task distillation (soft cross-entropy
on start and end logits, :func:`minirbt.distill.span_adaptor`) are :mod:`minirbt.finetune`'s.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from transformers import BertForQuestionAnswering

from minirbt import finetune as ft
from minirbt import stages
from minirbt.cli import check_ranges
from minirbt.distill import span_adaptor
from minirbt.tasks import BAD_ANSWER, MRCExample, cmrc_score, read_squad
from minirbt.textio import CorpusError
from minirbt.tokenization import load_tokenizer

EVAL_BATCH = 32


@dataclass
class MRCArguments(ft.CommonArguments):
    """run_mrc.py: the common flags, windows of 512 tokens by default (MiniRBT's CMRC 2018 setting) and span
    decoding."""

    max_seq_length: int = field(default=512, metadata={"help": "Tokens per window (question + context)."})
    doc_stride: int = field(default=128, metadata={"help": "Overlap between context windows, in tokens."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer in tokens."})
    n_best: int = field(default=20, metadata={"help": "Start/end candidates per window."})

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self, at_least_1=("doc_stride", "max_answer_length", "n_best"))
        if self.doc_stride >= self.max_seq_length:
            raise CorpusError(f"--doc_stride {self.doc_stride} must be below --max_seq_length "
                              f"{self.max_seq_length} (it is the overlap between windows)")


def mrc_features(tokenizer, examples: list[MRCExample], args: MRCArguments, train: bool) -> list[dict]:
    enc = tokenizer([e.question for e in examples], [e.context for e in examples], truncation="only_second",
                    max_length=args.max_seq_length, stride=args.doc_stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True)
    rows = []
    for i in range(len(enc["input_ids"])):
        ex_idx = enc["overflow_to_sample_mapping"][i]
        ex = examples[ex_idx]
        seq_ids = enc.sequence_ids(i)
        offsets = [o if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq_ids)]
        row = {"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i], "example": ex_idx,
               "offsets": offsets}
        if train:
            if ex.answer_start is None:
                continue  # answer_start did not match the context: counted when reading
            s_char, e_char = ex.answer_start, ex.answer_start + len(ex.answers[0])
            ctx = [k for k, o in enumerate(offsets) if o is not None]
            if offsets[ctx[0]][0] <= s_char and offsets[ctx[-1]][1] >= e_char:
                start = next(k for k in ctx if offsets[k][1] > s_char)
                end = next(k for k in reversed(ctx) if offsets[k][0] < e_char)
            else:
                start = end = 0  # the answer is not in this window: point at [CLS]
            row.update(start_positions=start, end_positions=end)
        rows.append(row)
    return rows


def decode(examples: list[MRCExample], rows: list[dict], starts, ends, n_best: int, max_len: int) -> dict:
    """The best-scoring span of each question over its windows, as context characters ("" when none)."""
    best: dict[int, tuple[float, str]] = {}
    flat_s = [x for b in starts for x in b]
    flat_e = [x for b in ends for x in b]
    for row, s_log, e_log in zip(rows, flat_s, flat_e):
        offsets = row["offsets"]
        n = len(offsets)
        s_idx = np.argsort(s_log[:n])[::-1][:n_best]
        e_idx = np.argsort(e_log[:n])[::-1][:n_best]
        ex = examples[row["example"]]
        for s in s_idx:
            for e in e_idx:
                if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_len:
                    continue
                score = float(s_log[s] + e_log[e])
                if row["example"] not in best or score > best[row["example"]][0]:
                    best[row["example"]] = (score, ex.context[offsets[s][0] : offsets[e][1]])
    return {ex.qid: best.get(i, (0.0, ""))[1] for i, ex in enumerate(examples)}


def check_windows(tokenizer, examples: list[MRCExample], args: MRCArguments) -> None:
    """Every window holds the whole question, [CLS] + 2 x [SEP] and more context tokens than the overlap."""
    lengths = tokenizer([e.question for e in examples], add_special_tokens=False)["input_ids"]
    longest = max(range(len(examples)), key=lambda i: len(lengths[i]))
    room = args.max_seq_length - len(lengths[longest]) - 3
    if room <= args.doc_stride:
        raise CorpusError(f"--max_seq_length {args.max_seq_length} leaves {max(room, 0)} context tokens per window "
                          f"after the longest question ({len(lengths[longest])} tokens, id "
                          f"{examples[longest].qid}) and [CLS]/[SEP]/[SEP], not more than --doc_stride "
                          f"{args.doc_stride}: raise --max_seq_length or lower --doc_stride")


def _read(args: MRCArguments) -> tuple:
    train_ex, train_rep = read_squad(args.train_file, training=True)
    train_rep.check(args.max_unusable_share, "training")
    dev_ex, dev_rep = read_squad(args.dev_file)
    dev_rep.check(args.max_unusable_share, "dev")
    test_ex, test_rep = read_squad(args.test_file, keep_unanswered=True) if args.test_file else (None, None)
    return train_ex, train_rep, dev_ex, dev_rep, test_ex, test_rep


def run_mrc(args: MRCArguments) -> dict:
    if args.task not in ("cmrc2018", "drcd"):
        raise CorpusError(f"unknown reading-comprehension task {args.task!r}: cmrc2018 or drcd")
    ft.check_common(args)
    train_ex, train_rep, dev_ex, dev_rep, test_ex, test_rep = _read(args)
    check_windows(load_tokenizer(args.model), train_ex + dev_ex + (test_ex or []), args)
    claim, _ = ft.claim_output(args, stages.MRC_RUN)
    if claim.state == "done":
        return ft.finished_results(args)
    train_ex, dev_ex, device, autocast, tokenizer = ft.prepare(args, train_ex, dev_ex, (train_rep, dev_rep, test_rep))
    pad_id = tokenizer.pad_token_id
    train_rows = mrc_features(tokenizer, train_ex, args, train=True)
    dev_rows = mrc_features(tokenizer, dev_ex, args, train=False)
    test_rows = mrc_features(tokenizer, test_ex, args, train=False) if test_ex else None
    scored_test = bool(test_ex) and all(e.answers for e in test_ex)  # a test file with answers is scored
    attn = args.distill_config().attn_implementation
    attn_kw = {"attn_implementation": attn} if attn else {}
    teacher = ft.quiet_load(BertForQuestionAnswering, args.teacher, **attn_kw).to(device).eval() if args.teacher \
        else None

    def predictions(model, examples, rows) -> dict[str, str]:
        starts, ends = ft.predict(model, rows, pad_id, EVAL_BATCH, device, autocast)
        return decode(examples, rows, starts, ends, args.n_best, args.max_answer_length)

    def after_training(model, _before, record: dict) -> dict:
        if not scored_test:
            return {}
        score = cmrc_score(test_ex, predictions(model, test_ex, test_rows))
        print(f"seed {record['seed']}: test EM {score['em']:.2f} F1 {score['f1']:.2f} (epoch "
              f"{record['best_epoch']})", flush=True)
        return {"test_em": score["em"], "test_f1": score["f1"]}

    task = ft.TaskRun(BertForQuestionAnswering, attn_kw, span_adaptor, train_rows,
                   score=lambda model: cmrc_score(dev_ex, predictions(model, dev_ex, dev_rows)), metric="f1",
                   recorded=("em", "f1"), describe=lambda s: f"dev EM {s['em']:.2f} F1 {s['f1']:.2f}",
                   after_training=after_training)
    t0 = time.perf_counter()
    per_seed = ft.fit_seeds(args, task, teacher, claim.state == "resume", device, autocast, pad_id)
    best_record, model = ft.best_model(args, task, per_seed, device)
    out = Path(args.output_dir)
    ft.write_json(out / "dev_predictions.json", predictions(model, dev_ex, dev_rows))
    if test_ex:
        ft.write_json(out / "test_predictions.json", predictions(model, test_ex, test_rows))
    results = {"task": args.task, "metric": "em/f1", "em": float(np.mean([r["em"] for r in per_seed])),
               "f1": float(np.mean([r["f1"] for r in per_seed])), "per_seed": per_seed,
               "best": {"em": max(r["em"] for r in per_seed), "f1": max(r["f1"] for r in per_seed)},
               "best_seed": best_record["seed"], "train_features": len(train_rows), "dev_questions": len(dev_ex),
               "skipped_bad_answers": train_rep.unusable.get(BAD_ANSWER, 0),
               "read": {name: rep.as_dict() for name, rep in zip(("train", "dev", "test"),
                                                                 (train_rep, dev_rep, test_rep)) if rep is not None},
               "seconds": time.perf_counter() - t0, "args": asdict(args)}
    if scored_test:
        results |= {"test_em": float(np.mean([r["test_em"] for r in per_seed])),
                    "test_f1": float(np.mean([r["test_f1"] for r in per_seed])), "test_questions": len(test_ex)}
    ft.finish_run(args, stages.MRC_RUN, model, results)
    return results
