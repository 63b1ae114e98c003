"""The optimizer of the recipe: AdamW as MiniRBT ran it, or PyTorch's.

MiniRBT (and TextBrewer's examples) used transformers 4.x ``AdamW(correct_bias=False)``
with ``eps=1e-6``: Adam moments *without* bias correction, so the first updates differ
from PyTorch's bias-corrected ones (step 1 is larger by ``(1 - beta1) / sqrt(1 - beta2)``,
3.16x at the usual betas, fading as the moments fill; warm-up keeps it small), and weight
decay applied after the update, ``p -= lr * wd * p``. transformers 5 removed that class; :class:`AdamWNoBiasCorrection`
is that update. With bias correction on, :func:`build_optimizer` returns
``torch.optim.AdamW``, its fused kernel when the parameters are on CUDA.

Parameter groups follow BERT: no weight decay on biases and LayerNorm weights, nor on
the match projections (MiniRBT/TextBrewer give them none).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn


class AdamWNoBiasCorrection(torch.optim.Optimizer):
    """transformers 4.x ``AdamW(correct_bias=False)``: ``p -= lr * m / (sqrt(v) + eps)``, then ``p -= lr * wd * p``."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        if not lr > 0 or not eps > 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or weight_decay < 0:
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            exp_avg, exp_avg_sq = [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avg.append(state["exp_avg"])
                exp_avg_sq.append(state["exp_avg_sq"])
            grads = [p.grad for p in params]
            torch._foreach_lerp_(exp_avg, grads, 1 - beta1)  # m = beta1 m + (1 - beta1) g
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(params, exp_avg, denom, value=-group["lr"])
            if group["weight_decay"] > 0:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        return loss


def parameter_groups(model: nn.Module, projections: nn.Module | None, weight_decay: float) -> list[dict]:
    """Weight decay on the model's matrices only: not on biases, LayerNorm weights or match projections."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "LayerNorm" not in name else no_decay).append(p)
    if projections is not None:
        no_decay += [p for p in projections.parameters() if p.requires_grad]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: Iterable[dict], lr: float, eps: float, bias_correction: bool) -> torch.optim.Optimizer:
    """MiniRBT's update (``bias_correction=False``) or PyTorch's AdamW, over BERT-style parameter groups."""
    groups = list(groups)
    if bias_correction:
        params = [p for g in groups for p in g["params"]]
        # PyTorch's fused CUDA kernel (one launch for every tensor); its default there is the foreach path
        fused = {"fused": True} if params and all(p.is_cuda and p.is_floating_point() for p in params) else {}
        return torch.optim.AdamW(groups, lr=lr, eps=eps, **fused)
    return AdamWNoBiasCorrection(groups, lr=lr, eps=eps)  # multi-tensor (foreach) updates: a few launches per group


class Optimization:
    """Optimizer, linear warm-up/decay schedule and gradient clipping of one training run: every stage steps the
    same way (pretraining, classification and span extraction)."""

    def __init__(self, model: nn.Module, projections: nn.Module | None, *, lr: float, weight_decay: float,
                 eps: float, bias_correction: bool, warmup_steps: int, total_steps: int, max_grad_norm: float):
        from transformers import get_linear_schedule_with_warmup

        self.optimizer = build_optimizer(parameter_groups(model, projections, weight_decay), lr, eps,
                                         bias_correction)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup_steps, total_steps)
        self.max_grad_norm = max_grad_norm
        # clipped in module order (the norm's float sum depends on it): the model's, then the projections'
        self.params = list(model.parameters()) + (list(projections.parameters()) if projections is not None else [])

    def clip(self) -> torch.Tensor:
        """Clip the gradients to ``max_grad_norm``; returns their norm before clipping (inf/NaN when non-finite)."""
        return torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)

    def step(self, update: bool = True) -> None:
        """Apply the update (unless ``update`` is False: a skipped step), advance the schedule, clear gradients."""
        if update:
            self.optimizer.step()
        with warnings.catch_warnings():
            # A skipped step still advances the schedule (on purpose: the schedule follows the step count, which
            # resume relies on); torch warns when that happens before any optimizer step.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
