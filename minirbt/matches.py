"""Distillation losses and intermediate matches, described as data (TextBrewer's format).

A match is a dict, exactly as in TextBrewer's ``intermediate_matches``::

    {"layer_T": 4, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
     "proj": ["linear", 256, 768]}

* ``feature: "hidden"``: layer 0 is the embedding output, layer i the output of
  transformer layer i (Hugging Face's ``hidden_states`` tuple).
* ``feature: "attention"``: layer i (1-based, like hidden states) is the attention
  of transformer layer i. Hugging Face returns attention *probabilities* (after
  softmax); TextBrewer's ``attention_ce*`` losses expect raw scores and would apply
  softmax twice, so those two are re-implemented here for probabilities. Any
  attention match switches both models to eager attention (SDPA returns none).
* ``fsp``/``gram``/``mmd``/``nst`` take pairs: ``"layer_T": [i, j]``.
* ``proj``: ``[kind, dim_S, dim_T]`` with kind ``linear``, ``relu`` or ``tanh``, a
  trained projection of the student's feature to the teacher's width.
* ``feature: "relation"``, ``loss: "relation_kl"`` (MiniLMv2): ``"relation"`` is
  ``query``, ``key`` or ``value``; the queries (keys, values) of transformer layer i
  (1-based) are split into ``"heads"`` relation heads, their scaled dot products
  softmaxed over the (unpadded) keys, and the student's relations pulled to the
  teacher's by KL divergence. Widths and attention-head counts may differ (the
  relation heads must divide both widths); no projection. The queries are the
  layer's own ``query`` projection of its input (``hidden_states[i - 1]``), so the
  models run as usual and nothing is hooked.

Everything else is TextBrewer's own loss functions (``textbrewer.losses``); its two that
run at every step, ``hid_mse_loss`` and ``kd_ce_loss``, with their gradients written out
(``minirbt.losses``, equal in value and gradient).
Presets: MiniRBT's hidden-state recipes and TextBrewer's example presets, by name.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from textbrewer.losses import (
    att_mse_loss,
    att_mse_sum_loss,
    cos_loss,
    fsp_loss,
    kd_mse_loss,
    mmd_loss,
    pkd_loss,
)
from torch import nn

from minirbt.losses import hidden_mse, soft_cross_entropy
from minirbt.textio import CorpusError

_EPS = 1e-12


def att_prob_ce_loss(attention_S: torch.Tensor, attention_T: torch.Tensor, mask: torch.Tensor | None = None):
    """Cross-entropy between attention *probabilities* (B, H, L, L), over valid query rows."""
    ce = -(attention_T * torch.log(attention_S.clamp_min(_EPS))).sum(dim=-1)  # (B, H, L)
    if mask is None:
        return ce.mean()
    m = mask.to(ce).unsqueeze(1).expand_as(ce)
    return (ce * m).sum() / m.sum()


def att_prob_ce_mean_loss(attention_S: torch.Tensor, attention_T: torch.Tensor, mask: torch.Tensor | None = None):
    """As :func:`att_prob_ce_loss` on the head-averaged attention."""
    if attention_S.dim() == 4:
        attention_S, attention_T = attention_S.mean(dim=1), attention_T.mean(dim=1)
    ce = -(attention_T * torch.log(attention_S.clamp_min(_EPS))).sum(dim=-1)  # (B, L)
    if mask is None:
        return ce.mean()
    m = mask.to(ce)
    return (ce * m).sum() / m.sum()


RELATIONS = ("query", "key", "value")
MIN_RELATION_HEAD_DIM = 8  # the rule's relation heads: MiniLMv2's base-size student has 384 / 48 = 8 dimensions


def relation_inputs(layers, hidden: tuple, layer: int, relation: str) -> torch.Tensor:
    """Queries, keys or values (B, L, width) of transformer layer ``layer`` (1-based): that layer's own linear
    projection of its input, ``hidden[layer - 1]`` (``layers``: the model's ``bert.encoder.layer``)."""
    linear = getattr(layers[layer - 1].attention.self, relation)
    return linear(hidden[layer - 1].to(linear.weight.dtype)).float()  # also outside the forward's autocast


def _log_relations(x: torch.Tensor, heads: int, keys: torch.Tensor | None) -> torch.Tensor:
    b, n, width = x.shape
    h = x.float().view(b, n, heads, width // heads).transpose(1, 2)  # (B, R, L, d)
    scores = h @ h.transpose(-1, -2) / math.sqrt(width // heads)
    if keys is not None:  # finite, not -inf: masked terms must stay 0 * finite in the KL
        scores = scores.masked_fill(~keys[:, None, None, :], torch.finfo(scores.dtype).min / 4)
    return torch.log_softmax(scores, dim=-1)


def relation_kl_loss(x_S: torch.Tensor, x_T: torch.Tensor, mask: torch.Tensor | None = None, heads: int = 1):
    """MiniLMv2's self-attention relation loss: KL(teacher || student) between softmax(x x^T / sqrt(d)) over the
    keys, per relation head, averaged over relation heads and unpadded query positions."""
    keys = mask.bool() if mask is not None else None
    log_s, log_t = _log_relations(x_S, heads, keys), _log_relations(x_T, heads, keys)
    kl = log_t.exp() * (log_t - log_s)
    if keys is not None:
        kl = kl.masked_fill(~keys[:, None, None, :], 0.0)
    kl = kl.sum(dim=-1)  # (B, R, L)
    if keys is None:
        return kl.mean()
    rows = keys[:, None, :].expand_as(kl).to(kl)
    return (kl * rows).sum() / rows.sum()


def relation_heads(hidden_T: int, hidden_S: int) -> int:
    """The most relation heads (at most 48, MiniLMv2's) dividing both widths, at >= 8 student dimensions each."""
    return next(r for r in range(48, 0, -1) if hidden_T % r == 0 and hidden_S % r == 0
                and (hidden_S // r >= MIN_RELATION_HEAD_DIM or r == 1))


MATCH_LOSSES = {
    "attention_mse": att_mse_loss,
    "attention_mse_sum": att_mse_sum_loss,
    "attention_ce": att_prob_ce_loss,
    "attention_ce_mean": att_prob_ce_mean_loss,
    "hidden_mse": hidden_mse,
    "cos": cos_loss,
    "pkd": pkd_loss,
    "gram": fsp_loss,
    "fsp": fsp_loss,
    "mmd": mmd_loss,
    "nst": mmd_loss,
    "relation_kl": relation_kl_loss,
}
PAIR_LOSSES = {"gram", "fsp", "mmd", "nst"}

KD_LOSSES = {"ce": soft_cross_entropy, "mse": kd_mse_loss}
PROJECTIONS = {"linear": None, "relu": nn.ReLU, "tanh": nn.Tanh}


def _hidden_mse(pairs, proj=None, weight=1):
    out = []
    for t, s in pairs:
        m = {"layer_T": t, "layer_S": s, "feature": "hidden", "loss": "hidden_mse", "weight": weight}
        if proj:
            m["proj"] = list(proj)
        out.append(m)
    return out


def _att(pairs, loss):
    return [{"layer_T": t, "layer_S": s, "feature": "attention", "loss": loss, "weight": 1} for t, s in pairs]


def _pairs(pairs, loss, proj=None):
    out = []
    for t, s in pairs:
        m = {"layer_T": [t, t], "layer_S": [s, s], "feature": "hidden", "loss": loss, "weight": 1}
        if proj:
            m["proj"] = list(proj)
        out.append(m)
    return out


def _relations(layer_T: int, layer_S: int, heads: int) -> list[dict]:
    return [{"layer_T": layer_T, "layer_S": layer_S, "feature": "relation", "loss": "relation_kl", "relation": r,
             "heads": heads, "weight": 1} for r in RELATIONS]


_L12_L6 = [(0, 0), (2, 1), (4, 2), (6, 3), (8, 4), (10, 5), (12, 6)]
_L6_L6 = [(i, i) for i in range(7)]
_L12_L4 = [(0, 0), (3, 1), (6, 2), (9, 3), (12, 4)]
_L12_L3 = [(0, 0), (4, 1), (8, 2), (12, 3)]

PRESETS: dict[str, list[dict]] = {
    # MiniRBT (ANCHORS.md): hidden-state MSE, weight 1, layer 0 = embeddings
    "L12_L6_hidden_mse": _hidden_mse(_L12_L6),  # RoBERTa -> RBT6 (same width)
    "L12_L6_hidden_mse_H256": _hidden_mse(_L12_L6, ["linear", 256, 768]),
    "L12_L6_hidden_mse_H288": _hidden_mse(_L12_L6, ["linear", 288, 768]),
    "L6_L6_hidden_mse_H256": _hidden_mse(_L6_L6, ["linear", 256, 768]),  # RBT6 -> MiniRBT-H256
    "L6_L6_hidden_mse_H288": _hidden_mse(_L6_L6, ["linear", 288, 768]),  # RBT6 -> MiniRBT-H288
    "L12_L4_hidden_mse_H312": _hidden_mse(_L12_L4, ["linear", 312, 768]),  # TinyBERT size
    # MiniLMv2 (Wang et al. 2021): Q-Q, K-K, V-V relations of the teacher's last layer -> the student's last layer
    "L6_minilmv2_H256": _relations(6, 6, 32),  # RBT6 (768) -> MiniRBT-H256: 32 relation heads of 24 / 8
    "L6_minilmv2_H288": _relations(6, 6, 32),  # RBT6 (768) -> MiniRBT-H288: 32 relation heads of 24 / 9
    "L12_L6_minilmv2_H256": _relations(12, 6, 32),  # RoBERTa-wwm-ext -> H256 in one stage
    # TextBrewer's example presets (examples/matches/matches.py), teacher of 12 layers
    "L3_attention_mse": _att(_L12_L3[1:], "attention_mse"),
    "L3_attention_ce": _att(_L12_L3[1:], "attention_ce"),
    "L3_attention_mse_sum": _att(_L12_L3[1:], "attention_mse_sum"),
    "L3_attention_ce_mean": _att(_L12_L3[1:], "attention_ce_mean"),
    "L3_hidden_mse": _hidden_mse(_L12_L3),
    "L3_hidden_smmd": _pairs(_L12_L3, "mmd"),
    "L3n_hidden_mse": _hidden_mse(_L12_L3, ["linear", 384, 768]),
    "L4_attention_mse": _att(_L12_L4[1:], "attention_mse"),
    "L4_attention_ce": _att(_L12_L4[1:], "attention_ce"),
    "L4_attention_mse_sum": _att(_L12_L4[1:], "attention_mse_sum"),
    "L4_attention_ce_mean": _att(_L12_L4[1:], "attention_ce_mean"),
    "L12_L4_hidden_mse": _hidden_mse(_L12_L4),  # 12 -> 4 layers, same width (no name of theirs)
    "L4_hidden_smmd": _pairs(_L12_L4, "mmd"),
    "L4t_hidden_mse": _hidden_mse(_L12_L4, ["linear", 312, 768]),
    "L4t_hidden_sgram": _pairs(_L12_L4, "gram", ["linear", 312, 768]),
    "L6_hidden_mse": _hidden_mse(_L12_L6),
    "L6_hidden_smmd": _pairs(_L12_L6, "mmd"),
    # MiniRBT's own names (pretraining/matches.py), meaning what they mean there
    "L4_hidden_mse": _hidden_mse([(i, i) for i in range(5)], ["linear", 312, 768]),  # RBT4 -> RBT4-H312
    "L6h256_roberta_hidden_mse": _hidden_mse(_L12_L6, ["linear", 256, 768]),
    "L6n0_hidden_mse": _hidden_mse(_L12_L6, ["linear", 288, 768]),
    "L6h256_rbt6_hidden_mse": _hidden_mse(_L6_L6, ["linear", 256, 768]),
    "L6h288_rbt6_hidden_mse": _hidden_mse(_L6_L6, ["linear", 288, 768]),
}


def uniform_hidden_mse(layers_T: int, layers_S: int, hidden_T: int, hidden_S: int) -> list[dict]:
    """MiniRBT's hidden-state MSE matches for any depths: (0, 0) and student layer i <- teacher layer i x LT / LS,
    with a trained linear projection where the widths differ (12 -> 6 layers at 768 -> 256: L12_L6_hidden_mse_H256)."""
    out = []
    for i in range(layers_S + 1):
        m = {"layer_T": i * layers_T // layers_S, "layer_S": i, "feature": "hidden", "loss": "hidden_mse",
             "weight": 1}
        if hidden_S != hidden_T:
            m["proj"] = ["linear", hidden_S, hidden_T]
        out.append(m)
    return out


def minilmv2_relations(layers_T: int, layers_S: int, hidden_T: int, hidden_S: int) -> list[dict]:
    """MiniLMv2 for any shapes: the teacher's last layer's Q-Q, K-K and V-V relations into the student's last
    layer, with :func:`relation_heads` relation heads."""
    return _relations(layers_T, layers_S, relation_heads(hidden_T, hidden_S))


# Matches computed from the two models' shapes: (layers_T, layers_S, hidden_T, hidden_S) -> matches.
RULES = {"uniform_hidden_mse": uniform_hidden_mse, "minilmv2_relations": minilmv2_relations}


def resolve_matches(specs: list[str] | None, shapes: tuple[int, int, int, int] | None = None) -> list[dict]:
    """Preset names, rule names (:data:`RULES`, given the models' ``shapes``: layers_T, layers_S, hidden_T,
    hidden_S), JSON files or inline JSON lists -> one list of match dicts (validated shape)."""
    matches: list[dict] = []
    for spec in specs or []:
        if spec in PRESETS:
            matches += copy.deepcopy(PRESETS[spec])
            continue
        if spec in RULES:
            if shapes is None:
                raise CorpusError(f"--matches {spec}: a rule computed from the teacher's and student's shapes, "
                                  f"and there is no teacher")
            matches += RULES[spec](*shapes)
            continue
        stripped = spec.lstrip()
        is_inline = stripped.startswith(("[", "{"))
        if not is_inline and not Path(spec).is_file():
            raise CorpusError(f"--matches {spec!r}: not a preset ({', '.join(PRESETS)}), a rule "
                              f"({', '.join(RULES)}), a JSON file or a JSON list")
        text = spec if is_inline else Path(spec).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise CorpusError(f"--matches {spec!r}: not a preset ({', '.join(PRESETS)}), "
                              "a JSON file or a JSON list") from None
        data = data if isinstance(data, list) else [data]
        matches += data
    for i, m in enumerate(matches):
        if not isinstance(m, dict):
            raise CorpusError(f"match {i}: not a dict: {m!r}")
        missing = [k for k in ("layer_T", "layer_S", "feature", "loss") if k not in m]
        if missing:
            raise CorpusError(f"match {i} lacks {missing}: {m}")
        if m["feature"] not in ("hidden", "attention", "relation"):
            raise CorpusError(f"match {i}: feature must be 'hidden', 'attention' or 'relation', not "
                              f"{m['feature']!r}")
        if m["loss"] not in MATCH_LOSSES:
            raise CorpusError(f"match {i}: unknown loss {m['loss']!r} (one of {', '.join(MATCH_LOSSES)})")
        if (m["feature"] == "relation") != (m["loss"] == "relation_kl"):
            raise CorpusError(f"match {i}: the relation feature and the relation_kl loss go together")
        if m["feature"] == "relation" and (m.get("relation") not in RELATIONS or not _is_index(m.get("heads"))
                                           or m["heads"] < 1 or isinstance(m["layer_T"], list)):
            raise CorpusError(f"match {i}: a relation match needs \"relation\": one of {', '.join(RELATIONS)}, "
                              f"\"heads\": a positive integer and single layer indices, got {m}")
        if m["feature"] == "attention" and m["loss"] not in {k for k in MATCH_LOSSES if k.startswith("attention")}:
            raise CorpusError(f"match {i}: attention features need an attention_* loss")
        for side in ("layer_T", "layer_S"):
            v = m[side]
            if not (_is_index(v) or (isinstance(v, list) and v and all(_is_index(x) for x in v))):
                raise CorpusError(f"match {i}: {side} must be a layer index or a list of them, got {v!r}")
        w = m.setdefault("weight", 1)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise CorpusError(f"match {i}: weight must be a finite number >= 0, got {w!r}")
        proj = m.get("proj")
        if proj is not None and not (isinstance(proj, list) and len(proj) == 3 and proj[0] in PROJECTIONS
                                     and all(_is_index(x) and x > 0 for x in proj[1:])):
            raise CorpusError(f"match {i}: proj must be [linear|relu|tanh, dim_S, dim_T], got {proj!r}")
    return matches


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def needs_hidden(matches: list[dict]) -> bool:
    """Hidden states: for hidden matches, and as the inputs of the layers whose relations are matched."""
    return any(m["feature"] in ("hidden", "relation") for m in matches)


def needs_attentions(matches: list[dict]) -> bool:
    return any(m["feature"] == "attention" for m in matches)


def check_matches(matches: list[dict], n_teacher: int, n_student: int, hidden_T: int, hidden_S: int,
                  heads_T: int | None = None, heads_S: int | None = None) -> None:
    """Layer indices in range, head counts and projections that fit, before any training starts."""
    for i, m in enumerate(matches):
        if m["loss"] in ("attention_mse", "attention_ce") and heads_T != heads_S:
            raise CorpusError(f"match {i}: {m['loss']} compares heads one to one, but the teacher has {heads_T} "
                              f"heads and the student {heads_S}: use {m['loss']}_sum/_mean style losses "
                              "(attention_mse_sum, attention_ce_mean)")
        if m["feature"] == "relation" and (hidden_T % m["heads"] or hidden_S % m["heads"]):
            raise CorpusError(f"match {i}: {m['heads']} relation heads do not divide the teacher's width {hidden_T} "
                              f"and the student's {hidden_S}: use a common divisor (e.g. "
                              f"{relation_heads(hidden_T, hidden_S)}, what the minilmv2_relations rule picks)")
        lo = 0 if m["feature"] == "hidden" else 1
        for side, n in (("layer_T", n_teacher), ("layer_S", n_student)):
            idx = m[side] if isinstance(m[side], list) else [m[side]]
            bad = [x for x in idx if not lo <= x <= n]
            if bad:
                raise CorpusError(f"match {i}: {side} {bad} out of range {lo}..{n} for {m['feature']} "
                                  f"({'attention layers count from 1' if lo else 'hidden layer 0 = embeddings'})")
        if isinstance(m["layer_T"], list) != (m["loss"] in PAIR_LOSSES):
            raise CorpusError(f"match {i}: loss {m['loss']} takes {'pairs' if m['loss'] in PAIR_LOSSES else 'single'}"
                              " layer indices")
        if m["feature"] == "hidden" and m["loss"] not in ("mmd", "nst"):
            proj = m.get("proj")
            if proj is None:
                if hidden_S != hidden_T:
                    raise CorpusError(f"match {i}: student width {hidden_S} != teacher width {hidden_T}: "
                                      f"add \"proj\": [\"linear\", {hidden_S}, {hidden_T}]")
            else:
                if len(proj) != 3 or proj[0] not in PROJECTIONS:
                    raise CorpusError(f"match {i}: proj must be [linear|relu|tanh, dim_S, dim_T], got {proj}")
                if (proj[1], proj[2]) != (hidden_S, hidden_T):
                    raise CorpusError(f"match {i}: proj {proj} does not fit student width {hidden_S} -> "
                                      f"teacher width {hidden_T}")


def build_projections(matches: list[dict]) -> nn.ModuleList:
    """One trained projection per match that asks for one (None-free ModuleList, Identity otherwise)."""
    mods = []
    for m in matches:
        proj = m.get("proj")
        if proj is None or m["feature"] != "hidden":
            mods.append(nn.Identity())
            continue
        linear = nn.Linear(int(proj[1]), int(proj[2]))
        nn.init.normal_(linear.weight, std=0.02)  # TextBrewer initialises projections like BERT layers
        nn.init.zeros_(linear.bias)
        act = PROJECTIONS[proj[0]]
        mods.append(linear if act is None else nn.Sequential(linear, act()))
    return nn.ModuleList(mods)


def student_features(matches: list[dict], projections: nn.ModuleList, hidden_S, att_S, layers_S=None) -> list:
    """What each match compares on the student's side (fp32), projected to the teacher's width. The projections
    are trained parameters of the student: pretraining runs this inside the student's forward, where DDP sees
    them (its reducer expects every trained parameter to be used inside forward). ``layers_S``: the student's
    encoder layers, for relation matches."""
    out = []
    for m, proj in zip(matches, projections):
        if m["feature"] == "relation":
            out.append(relation_inputs(_need(layers_S, "student"), hidden_S, m["layer_S"], m["relation"]))
            continue
        # attention layer i (1-based) is entry i-1 of the attentions tuple
        src = hidden_S if m["feature"] == "hidden" else [None, *att_S]
        layers = m["layer_S"] if isinstance(m["layer_S"], list) else [m["layer_S"]]
        feats = [proj(src[j].float()) if m["feature"] == "hidden" else src[j].float() for j in layers]
        out.append(feats if isinstance(m["layer_S"], list) else feats[0])
    return out


def match_losses(matches: list[dict], features_S: list, hidden_T, att_T, mask: torch.Tensor,
                 layers_T=None) -> list[torch.Tensor]:
    """Weighted loss of each match (fp32), in order; ``features_S`` from :func:`student_features`; ``layers_T``:
    the teacher's encoder layers, for relation matches."""
    out = []
    for m, fs in zip(matches, features_S):
        if m["feature"] == "relation":
            with torch.no_grad():  # the teacher is frozen
                ft = relation_inputs(_need(layers_T, "teacher"), hidden_T, m["layer_T"], m["relation"])
            out.append(m["weight"] * relation_kl_loss(fs, ft, mask=mask, heads=m["heads"]))
            continue
        src_T = hidden_T if m["feature"] == "hidden" else [None, *att_T]
        if isinstance(m["layer_T"], list):
            ft = [src_T[j].float() for j in m["layer_T"]]
        else:
            ft = src_T[m["layer_T"]].float()
        out.append(m["weight"] * MATCH_LOSSES[m["loss"]](fs, ft, mask=mask))
    return out


def _need(layers, side: str):
    if layers is None:
        raise CorpusError(f"relation matches need the {side}'s encoder layers (a BERT model), and none were given")
    return layers


def encoder_layers(model) -> nn.ModuleList | None:
    """``model.bert.encoder.layer`` of a transformers BERT with a head, or of a bare ``BertModel``."""
    bert = getattr(model, "bert", model)
    encoder = getattr(bert, "encoder", None)
    return getattr(encoder, "layer", None)
