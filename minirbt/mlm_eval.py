"""Masked-token evaluation of a student (and its teacher) on fixed dev masks, and the teacher check.

The LM heads run only on the masked positions (~15% of tokens: the vocabulary
projection dominates otherwise), in training and in evaluation alike.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import BertForMaskedLM

from minirbt.collator import ChineseWWMCollator
from minirbt.distributed import Dist, on_every_rank
from minirbt.dropout import ATTENTION
from minirbt.matches import KD_LOSSES
from minirbt.pretrain_setup import DistillArguments
from minirbt.textio import CorpusError

if TYPE_CHECKING:
    from minirbt.trainer import Run


def host_batch(collator: ChineseWWMCollator, examples: list[dict]) -> dict:
    """A collated batch plus what the step would otherwise ask the device for, computed here on the host: the
    flat indices of the masked positions (``select``), their true tokens (``masked_labels``) and whether any row
    is padded (``padded``). Boolean-mask indexing on the device would wait for the GPU at every forward."""
    batch = collator(examples)
    labels = batch["labels"].reshape(-1)
    batch["select"] = (labels != -100).nonzero().squeeze(1)
    batch["masked_labels"] = labels[batch["select"]]
    batch["padded"] = not bool(batch["attention_mask"].all())
    return batch


def encoder_mask(model: BertForMaskedLM, batch: dict) -> torch.Tensor | None:
    """The attention mask in the form the model's attention takes as-is. Given the 2-D mask, transformers checks on
    the device whether it has any padding (a host sync per forward); the host already knows: no padding gives
    None (SDPA may then pick its flash kernel), padding a 4-D mask built from the 2-D one."""
    if not batch.get("padded", True):
        return None
    implementation = model.config._attn_implementation
    keep = batch["attention_mask"][:, None, None, :].bool()
    if implementation in ("sdpa", ATTENTION):  # ATTENTION: SDPA with CPU dropout masks (minirbt.dropout)
        return keep
    if implementation == "eager":  # added to the scores
        return torch.zeros(keep.shape, dtype=model.dtype, device=keep.device).masked_fill(
            ~keep, torch.finfo(model.dtype).min)
    return batch["attention_mask"]  # other kernels (flash-attention) take the 2-D mask


def masked_lm_forward(model: BertForMaskedLM, batch: dict, hidden: bool, attentions: bool, logits: bool = True):
    """Encoder outputs, and MLM logits at the masked positions only (``batch["select"]``; None when ``logits`` is
    False: a run whose losses read no logits builds no LM-head output)."""
    out = model.bert(input_ids=batch["input_ids"], attention_mask=encoder_mask(model, batch),
                     token_type_ids=batch["token_type_ids"], output_hidden_states=hidden,
                     output_attentions=attentions)
    if not logits:
        return None, out.hidden_states, out.attentions
    masked = out.last_hidden_state.flatten(0, 1).index_select(0, batch["select"])
    return model.cls(masked), out.hidden_states, out.attentions


def teacher_forward(teacher: BertForMaskedLM | None, batch: dict, hidden: bool, attentions: bool,
                    logits: bool = True):
    if teacher is None:  # MLM pretraining without a teacher
        return None, None, None
    with torch.no_grad():
        return masked_lm_forward(teacher, batch, hidden, attentions, logits)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to the device (through pinned memory on CUDA: a copy from pageable memory waits for the stream);
    host-side values (``padded``) as they are."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


@torch.no_grad()
def evaluate_students(students: list[tuple[BertForMaskedLM, DistillArguments]], teacher: BertForMaskedLM | None,
                      dev, collator_seed: int, tokenizer, device: torch.device, autocast) -> list[dict]:
    """:func:`evaluate` of several students (each with its own args: KD loss, temperature) on the same dev masks,
    with one teacher forward per dev batch for all of them: the teacher is 10x a student's FLOPs, so evaluating
    students one by one would pay it once each."""
    first = students[0][1]
    for _, args in students[1:]:  # the masks and batches come from these: they must be the same for everyone
        for name in ("mlm_probability", "batch_size", "eval_batches"):
            if getattr(args, name) != getattr(first, name):
                raise ValueError(f"students evaluated together share {name}: {getattr(first, name)!r} != "
                                 f"{getattr(args, name)!r}")
    collator = ChineseWWMCollator(tokenizer, first.mlm_probability, seed=collator_seed)
    modes = [model.training for model, _ in students]
    for model, _ in students:
        model.eval()
    keys = ("n", "student_nll", "student_correct", "kd", "agree")
    totals = [dict.fromkeys(keys, 0.0) for _ in students]
    teacher_totals = {"nll": 0.0, "correct": 0}
    n_batches = min(first.eval_batches, math.ceil(len(dev) / first.batch_size))
    for b in range(n_batches):
        rows = dev[b * first.batch_size : (b + 1) * first.batch_size]
        batch = to_device(host_batch(collator, [dict(zip(rows, v)) for v in zip(*rows.values())]), device)
        labels = batch["masked_labels"]
        with autocast:
            lt, _, _ = teacher_forward(teacher, batch, False, False)
        if lt is not None:
            lt = lt.float()
            teacher_totals["nll"] += F.cross_entropy(lt, labels, reduction="sum").item()
            teacher_totals["correct"] += (lt.argmax(-1) == labels).sum().item()
        for (model, args), t in zip(students, totals):
            with autocast:
                ls = masked_lm_forward(model, batch, False, False)[0].float()
            t["n"] += labels.numel()
            t["student_nll"] += F.cross_entropy(ls, labels, reduction="sum").item()
            t["student_correct"] += (ls.argmax(-1) == labels).sum().item()
            if lt is not None:
                t["agree"] += (ls.argmax(-1) == lt.argmax(-1)).sum().item()
                t["kd"] += KD_LOSSES[args.kd_loss](ls, lt, args.temperature).item() * labels.numel()
    for (model, _), mode in zip(students, modes):
        model.train(mode)
    results = []
    for t in totals:
        n = max(t["n"], 1)
        result = {"student_mlm_accuracy": t["student_correct"] / n, "student_mlm_loss": t["student_nll"] / n,
                  "student_perplexity": math.exp(min(t["student_nll"] / n, 50))}
        if teacher is not None:
            result |= {"teacher_mlm_accuracy": teacher_totals["correct"] / n,
                       "teacher_perplexity": math.exp(min(teacher_totals["nll"] / n, 50)),
                       "top1_agreement": t["agree"] / n, "kd_loss": t["kd"] / n}
        results.append(result | {"tokens": int(t["n"])})
    return results


def evaluate_runs(runs: list[Run], d: Dist) -> list[dict]:
    """The dev scores of the students of one pass (``minirbt.trainer.Run``), one teacher pass for them all, on
    rank 0 (the other ranks get []); called on every rank, which all stop if it fails on rank 0."""
    if not runs:
        return []
    first = runs[0]
    return on_every_rank(d, lambda: evaluate_students(
        [(r.student.model, r.args) for r in runs], first.teacher, first.dev_set, first.args.seed + 1,
        first.tokenizer, first.device, first.autocast) if d.main else [], "the dev evaluation")


def evaluate(student: BertForMaskedLM, teacher: BertForMaskedLM | None, dev, collator_seed: int, tokenizer,
             args: DistillArguments, device: torch.device, autocast) -> dict:
    """Masked-token accuracy and perplexity of student (and teacher, and the KD loss) on fixed dev masks."""
    return evaluate_students([(student, args)], teacher, dev, collator_seed, tokenizer, device, autocast)[0]


def check_teacher(teacher: BertForMaskedLM, student: BertForMaskedLM, data, tokenizer, args: DistillArguments,
                  device: torch.device, autocast) -> dict:
    """Before step 1: the teacher's masked-token accuracy on held-out text (the train split when there is no dev
    split), printed, and refused below --min_teacher_accuracy: a teacher whose MLM head is untrained teaches
    noise for days."""
    split = "validation" if data.get("validation") is not None and len(data["validation"]) else "train"
    result = evaluate(student, teacher, data[split], args.seed + 1, tokenizer, args, device, autocast)
    acc = result["teacher_mlm_accuracy"]
    tqdm.write(f"teacher check: masked-token accuracy {100 * acc:.2f}% on {result['tokens']} {split} tokens "
               f"(floor --min_teacher_accuracy {100 * args.min_teacher_accuracy:g}%; chance "
               f"{100 / teacher.config.vocab_size:.3f}%)")
    if acc < args.min_teacher_accuracy:
        raise CorpusError(f"the teacher {args.teacher} predicts only {100 * acc:.2f}% of masked tokens on the "
                          f"{split} split, below --min_teacher_accuracy {args.min_teacher_accuracy:g}: is its MLM "
                          f"head trained, and its vocab the dataset's? Pass --min_teacher_accuracy 0 to distil "
                          f"from it anyway")
    return result
