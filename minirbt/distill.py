"""The distillation loss, written once for every stage, in TextBrewer's vocabulary.

A stage (MLM pretraining, classification, span extraction, NER) differs only in what its
model returns, so each has an *adaptor* (TextBrewer's word) that turns the model's
outputs and the batch into the same four things:

* ``logits``: the outputs the KD loss compares, student against teacher (MLM: the
  masked positions only; MRC: start and end, averaged);
* ``losses``: the hard-label losses by name (``mlm``, ``hard_label``), computed only
  when ``hard_label_weight`` is non-zero;
* ``hidden`` / ``attention``: the tuples the intermediate matches read (and ``layers``, the model's encoder
  layers, which relation matches apply to the hidden states; set by the loop that runs the models).

:func:`distill_terms` then assembles the weighted terms of one batch::

    kd_loss_weight x mean over logits of KD(student, teacher; temperature)
    + hard_label_weight x each hard-label loss
    + every intermediate match (``minirbt.matches``)

A new loss or match type is added in ``minirbt.matches`` and works in every stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from minirbt.matches import KD_LOSSES, match_losses, needs_attentions, needs_hidden, student_features
from minirbt.textio import CorpusError


@dataclass
class DistillConfig:
    """TextBrewer's ``DistillationConfig`` fields that this toolkit uses (no schedulers)."""

    temperature: float
    kd_loss_type: str = "ce"
    kd_loss_weight: float = 1.0
    hard_label_weight: float = 0.0
    intermediate_matches: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.kd_loss_type not in KD_LOSSES:
            raise CorpusError(f"--kd_loss must be one of {', '.join(KD_LOSSES)}, got {self.kd_loss_type!r}")

    @property
    def needs_hidden(self) -> bool:
        return needs_hidden(self.intermediate_matches)

    @property
    def needs_attentions(self) -> bool:
        return needs_attentions(self.intermediate_matches)

    @property
    def needs_logits(self) -> bool:
        """Whether any loss reads the head's outputs (a matches-only run needs no LM head)."""
        return bool(self.kd_loss_weight or self.hard_label_weight)

    @property
    def attn_implementation(self) -> str | None:
        """Eager attention when a match reads attention probabilities (SDPA returns none)."""
        return "eager" if self.needs_attentions else None


Adapted = dict  # {"logits": [Tensor], "losses": {name: Tensor}, "hidden": tuple | None, "attention": ...}


# ------------------------------------------------------------------ adaptors, one per head
def mlm_adaptor(outputs: tuple, batch: dict, labels: bool) -> Adapted:
    """``outputs``: (LM logits at the masked positions, hidden states, attentions), see
    ``minirbt.mlm_eval.masked_lm_forward``; ``batch["masked_labels"]`` holds the true tokens at those positions.
    Logits None: no loss needs them."""
    logits, hidden, attention = outputs
    if logits is None:  # no loss reads them (DistillConfig.needs_logits)
        return {"logits": [], "losses": {}, "hidden": hidden, "attention": attention}
    logits = logits.float()
    losses = {"mlm": F.cross_entropy(logits, batch["masked_labels"])} if labels else {}
    return {"logits": [logits], "losses": losses, "hidden": hidden, "attention": attention}


def classification_adaptor(outputs, batch: dict, labels: bool) -> Adapted:
    """Sequence classification; rows labelled -100 (augmented or unlabelled, taught by the teacher alone)
    have no hard-label loss."""
    logits = outputs.logits.float()
    losses = {}
    if labels:
        gold = batch["label"] != -100
        if gold.any():
            losses["hard_label"] = F.cross_entropy(logits[gold], batch["label"][gold])
    return {"logits": [logits], "losses": losses, "hidden": outputs.hidden_states,
            "attention": outputs.attentions}


def span_adaptor(outputs, batch: dict, labels: bool) -> Adapted:
    """Span extraction: start and end logits, each half of the loss."""
    start, end = outputs.start_logits.float(), outputs.end_logits.float()
    losses = {}
    if labels:
        losses["hard_label"] = (F.cross_entropy(start, batch["start_positions"])
                                + F.cross_entropy(end, batch["end_positions"])) / 2
    return {"logits": [start, end], "losses": losses, "hidden": outputs.hidden_states,
            "attention": outputs.attentions}


def token_adaptor(outputs, batch: dict, labels: bool) -> Adapted:
    """Token classification (NER): the tag logits of every scored position (a token's first sub-token, where
    ``batch["labels"]`` is not -100), one row each, for the KD loss and the hard-label loss alike."""
    scored = batch["labels"] != -100
    logits = outputs.logits.float()[scored]
    losses = {"hard_label": F.cross_entropy(logits, batch["labels"][scored])} if labels else {}
    return {"logits": [logits], "losses": losses, "hidden": outputs.hidden_states,
            "attention": outputs.attentions}


# ------------------------------------------------------------------ the loss
def distill_terms(config: DistillConfig, student: Adapted, teacher: Adapted | None, projections: nn.ModuleList,
                  attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every weighted loss term of one batch (fp32), by name: ``kd``, the hard-label losses, ``match{i}_{loss}``.
    Their sum is the loss. Without a teacher only the hard-label losses remain."""
    terms: dict[str, torch.Tensor] = {}
    if teacher is not None and config.kd_loss_weight:
        kd_loss = KD_LOSSES[config.kd_loss_type]
        kd = [kd_loss(s, t.float(), config.temperature) for s, t in zip(student["logits"], teacher["logits"])]
        terms["kd"] = config.kd_loss_weight * (kd[0] if len(kd) == 1 else sum(kd) / len(kd))
    if config.hard_label_weight:
        for name, loss in student["losses"].items():
            terms[name] = config.hard_label_weight * loss
    if teacher is not None and config.intermediate_matches:
        matches = config.intermediate_matches
        features = student.get("features")  # already projected inside the student's forward (pretraining)
        if features is None:
            features = student_features(matches, projections, student["hidden"], student["attention"],
                                        student.get("layers"))
        for i, loss in enumerate(match_losses(matches, features, teacher["hidden"], teacher["attention"],
                                              attention_mask, teacher.get("layers"))):
            terms[f"match{i}_{matches[i]['loss']}"] = loss
    return terms


def nonfinite_terms(terms: dict[str, torch.Tensor]) -> list[str]:
    """``term NAME = VALUE`` for each NaN/inf term (empty: all finite). One host sync for all the terms."""
    return nonfinite_values(dict(zip(terms, term_values(terms).tolist())))


def term_values(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The terms' values as one detached fp32 vector on their device (read back once, not term by term)."""
    if not terms:
        return torch.zeros(0)
    return torch.stack([v.detach().float().reshape(()) for v in terms.values()])


def nonfinite_values(values: dict[str, float]) -> list[str]:
    return [f"term {name} = {v}" for name, v in values.items() if not math.isfinite(v)]
