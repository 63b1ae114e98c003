"""TextBrewer's two losses that run at every distillation step, with their gradients written out.

``hid_mse_loss`` (MiniRBT's seven hidden-state matches) and ``kd_ce_loss`` (the soft cross-entropy at T = 8)
are built by TextBrewer from autograd's pieces, each one a pass over its tensor forward and another backward.
The functions here compute the same value and the same student gradient (the tests compare both with
TextBrewer's, in float64) in fewer passes, and hand every case they were not written for to TextBrewer's own
function. The teacher side is frozen: no gradient for it.
"""

from __future__ import annotations

import torch
from textbrewer.losses import hid_mse_loss, kd_ce_loss


def _written_for(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """The case both written-out losses cover: a frozen teacher of the student's shape, and something in it."""
    return not teacher.requires_grad and student.shape == teacher.shape and student.numel() > 0


class _SoftCrossEntropy(torch.autograd.Function):
    """TextBrewer's ``kd_ce_loss`` for a float temperature and a frozen teacher, with the gradient written out:
    d/ds of -mean(softmax(t/T) . log_softmax(s/T)) is (softmax(s/T) - softmax(t/T)) / (T x rows). Autograd's
    chain (divide, log-softmax, multiply, sum, and each one's backward) made ~9 passes over the (masked
    positions x 21,128) logits; this makes 5, and the loss is one dot product."""

    @staticmethod
    def forward(ctx, logits_S: torch.Tensor, logits_T: torch.Tensor, temperature: float) -> torch.Tensor:
        log_q = torch.log_softmax(logits_S / temperature, dim=-1)
        p_T = torch.softmax(logits_T.to(log_q.dtype) / temperature, dim=-1)
        rows = log_q.numel() // max(log_q.shape[-1], 1)
        ctx.save_for_backward(log_q, p_T)
        ctx.scale = 1.0 / (temperature * rows)
        return -torch.dot(p_T.flatten(), log_q.flatten()) / rows

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_q, p_T = ctx.saved_tensors
        grad_S = torch.exp(log_q).sub_(p_T).mul_(grad * ctx.scale)
        return grad_S, None, None


def soft_cross_entropy(logits_S: torch.Tensor, logits_T: torch.Tensor, temperature=1) -> torch.Tensor:
    """``textbrewer.losses.kd_ce_loss`` (same value and student gradient; the tests check both). A tensor
    temperature, a teacher that needs a gradient or an empty batch goes to TextBrewer's own function."""
    if isinstance(temperature, torch.Tensor) or not _written_for(logits_S, logits_T):
        return kd_ce_loss(logits_S, logits_T, temperature)
    return _SoftCrossEntropy.apply(logits_S, logits_T.detach(), float(temperature))


class _HiddenMSE(torch.autograd.Function):
    """Squared error summed over the features and the ``weights``' rows, over ``count``: 3 passes forward
    (difference, weighting, one dot product) and 1 backward, against ~5 and ~4 through autograd."""

    @staticmethod
    def forward(ctx, state_S: torch.Tensor, state_T: torch.Tensor, weights: torch.Tensor | None, count):
        # fp32 at least, whatever the student's dtype (a bf16 projection under autocast)
        dtype = torch.promote_types(torch.promote_types(state_S.dtype, state_T.dtype), torch.float32)
        diff = state_S.to(dtype) - state_T
        weighted = diff if weights is None else diff * weights
        ctx.save_for_backward(weighted)
        ctx.count, ctx.dtype = count, state_S.dtype
        return torch.dot(weighted.flatten(), diff.flatten()) / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weighted,) = ctx.saved_tensors
        return weighted.mul(grad * 2.0 / ctx.count).to(ctx.dtype), None, None, None


def hidden_mse(state_S: torch.Tensor, state_T: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``textbrewer.losses.hid_mse_loss``: the mean squared error over the tokens ``mask`` keeps (all without
    one), fp32. One difference: TextBrewer counts the kept tokens in the student's dtype, which under bf16
    autocast rounds counts above 256 (1,023 tokens count as 1,024); here the count is exact. A teacher that
    needs a gradient, broadcasting shapes or a mask not of shape (..., length) go to TextBrewer's function."""
    if not _written_for(state_S, state_T) or (mask is not None and tuple(mask.shape) != tuple(state_S.shape[:-1])):
        return hid_mse_loss(state_S, state_T, mask)
    if mask is None:
        return _HiddenMSE.apply(state_S, state_T.detach(), None, float(state_S.numel()))
    weights = mask.to(torch.float32).unsqueeze(-1)
    # a tensor, not a Python number: no host sync on CUDA; exact in fp32 below 2**24 tokens
    return _HiddenMSE.apply(state_S, state_T.detach(), weights, weights.sum() * state_S.shape[-1])
