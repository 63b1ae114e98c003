"""Dropout with cheaper masks on the CPU: the same distribution, a sixth of the random-number cost.

On the CPU, ``torch.nn.functional.dropout`` draws its mask with ``bernoulli_``, which costs ~3x a plain draw
of 32-bit random integers (1.4 vs 0.4 ms for a 8 x 128 x 256 batch here); in a distillation step of the
demo's shapes the student's dropout masks were 13% of the step. :func:`keep_mask` splits each 31-bit
draw of ``random_()`` into two 15-bit ones, and :class:`CPUDropout` drops an element when its draw is below
``round(p * 2**15)`` (so P(drop) = p to within 2**-16), scales the kept ones by ``1 / (1 - p)`` and saves
the 0/1 mask, in the input's dtype, for backward. The draws come from torch's default CPU generator, so masks follow
``torch.manual_seed`` as before (resume and 1-vs-N-process equality hold); they are a different stream
from ``bernoulli_``'s, so masks differ from a run of the stock layer. On CUDA (and for any tensor off the
CPU) the stock fused kernel is used: it is already cheap there.

Attention-probability dropout happens inside SDPA, which on the CPU falls back to its math path with
``bernoulli_`` whenever ``dropout_p > 0`` (5 ms of a 20 ms layer here). :func:`use_cpu_dropout` therefore
also switches a model on SDPA to the attention kernel registered here as ``ATTENTION``: SDPA as before
when there is no dropout (eval, the teacher) or off the CPU, else the same math (scores, softmax accumulated in
fp32, dropout, weighted values) with :func:`cpu_dropout`. It is a runtime setting: saved folders name no kernel
(``save_model`` writes a model's config, which does not serialise it), and reload on SDPA.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "minirbt_sdpa_cpu_dropout"

_LEVELS = 2**15  # each 31-bit draw of random_() on int32 gives two 15-bit draws (its int16 halves, masked)


class _KeepScale(torch.autograd.Function):
    """``x / (1 - p)`` times a 0/1 mask in ``x``'s dtype, which is all backward keeps. Two multiplications: on
    the CPU, ops with a bool operand (``masked_fill_``, ``where``, ``x * mask``) run 4-7x slower than a
    same-dtype multiply (1.0 vs 0.24 ms for 8 x 8 x 128 x 128 bf16 here); the scale first, so a bf16 result
    is the bf16 rounding of ``x * scale`` as before, dropped elements then multiplied by zero, as the stock
    layer's ``x * noise`` does (a NaN stays NaN)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * scale).mul_(keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return (grad * ctx.scale).mul_(keep), None, None


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1 where an element is kept, 0 where it drops, in ``dtype``, with P(0) = round(p * 2**15) / 2**15 (p to
    within 2**-16). torch's CPU generator is serial (mt19937, one 32-bit number per element whatever the dtype):
    one int32 draw per *two* elements, its halves' low 15 bits uniform and independent, halves its cost. The
    0/1 values come from int16 arithmetic (a comparison would give bool, slow to convert)."""
    n, threshold = math.prod(shape), int(round(p * _LEVELS))
    draws = torch.empty((n + 1) // 2, dtype=torch.int32).random_()  # first: the generator advances alike for any p
    if threshold >= _LEVELS:  # p within 2**-16 of 1: every draw is below it (and it does not fit in int16)
        return torch.zeros(shape, dtype=dtype)
    halves = draws.view(torch.int16)[:n].bitwise_and_(_LEVELS - 1)
    # draw - threshold < 0 (drop) -> -1 -> 0; >= 0 (keep) -> 0 -> 1 (both in int16's range)
    keep = halves.sub_(threshold).clamp_(-1, 0).add_(1)
    return keep.to(dtype).view(shape)


def cpu_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with :func:`keep_mask`'s masks on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return nn.functional.dropout(x, p, training)
    return _KeepScale.apply(x, keep_mask(x.shape, p, x.dtype), 1.0 / (1.0 - p))


class CPUDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU masks come from :func:`cpu_dropout` (same ``p``, same state dict: none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_dropout(x, self.p, self.training)


def sdpa_cpu_dropout(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with :func:`cpu_dropout` on the probabilities when it drops on the CPU.
    Takes SDPA's masks (boolean, True = attend, or additive); returns (batch, query, heads, head_dim)."""
    if dropout == 0.0 or query.device.type != "cpu" or getattr(module, "num_key_value_groups", 1) > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # the scale on the queries (a quarter of the scores' size at head_dim 32 and length 128)
    scores = torch.matmul(query * scale, key.transpose(-1, -2))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            # in place: backward needs the matmul's inputs and the softmax's output, not the scores
            scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores.add_(attention_mask)
    if scores.dtype in (torch.float32, torch.bfloat16):  # CPU softmax of bf16 runs in fp32 inside: no casts
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    context = torch.matmul(cpu_dropout(probs, dropout), value)
    return context.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, sdpa_cpu_dropout)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)  # the same masks as SDPA


def use_cpu_dropout(model: nn.Module) -> int:
    """Swap every stock ``nn.Dropout`` in ``model`` for :class:`CPUDropout` in place and, if the model runs SDPA
    attention, switch it to :data:`ATTENTION`; returns how many layers were swapped."""
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, CPUDropout(child.p, child.inplace).train(child.training))
                swapped += 1
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(ATTENTION)
    return swapped
