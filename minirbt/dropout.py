"""Dropout with cheaper masks on the CPU: the same distribution, a third of the random-number cost.

On the CPU, ``torch.nn.functional.dropout`` draws its mask with ``bernoulli_``, which costs ~3x a plain draw
of 32-bit random integers (1.4 vs 0.4 ms for a 8 x 128 x 256 batch here); in a distillation step of the
demo's shapes the student's dropout masks were 13% of the step. :class:`CPUDropout` keeps an element when a
uniform 31-bit integer is at least ``p * 2**31`` (so P(drop) = p to within 2**-31), scales the kept ones by
``1 / (1 - p)`` and saves a one-byte mask for backward. The draws come from torch's default CPU generator,
so masks follow ``torch.manual_seed`` as before (resume and 1-vs-N-process equality hold); they are a
different stream from ``bernoulli_``'s, so masks differ from a run of the stock layer. On CUDA (and for
any tensor off the CPU) the stock fused kernel is used: it is already cheap there.

Attention-probability dropout happens inside SDPA, which on the CPU falls back to its math path with
``bernoulli_`` whenever ``dropout_p > 0`` (5 ms of a 20 ms layer here). :func:`use_cpu_dropout` therefore
also switches a model on SDPA to the attention kernel registered here as ``ATTENTION``: SDPA as before
when there is no dropout (eval, the teacher) or off the CPU, else the same math (scores, softmax in fp32,
dropout, weighted values) with :func:`cpu_dropout`. It is a runtime setting: saved folders name no kernel
(``save_model`` writes a model's config, which does not serialise it), and reload on SDPA.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "minirbt_sdpa_cpu_dropout"

_SPAN = 2**31  # random_() on int32 draws uniformly from [0, 2**31 - 1]


class _MaskedScale(torch.autograd.Function):
    """``x * keep / (1 - p)`` with only the bool mask saved for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


def cpu_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with the integer-threshold mask on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return nn.functional.dropout(x, p, training)
    keep = torch.empty(x.shape, dtype=torch.int32).random_() >= int(round(p * _SPAN))
    return _MaskedScale.apply(x, keep, 1.0 / (1.0 - p))


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
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
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
