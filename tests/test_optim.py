"""The recipe's optimizer: MiniRBT's AdamW without bias correction, checked against its formula."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_bert

from minirbt.matches import build_projections
from minirbt.optim import AdamWNoBiasCorrection, build_optimizer, parameter_groups


def _reference(p, grads, lr, wd, eps, betas=(0.9, 0.999)):
    """transformers 4.x AdamW(correct_bias=False), element by element."""
    p = p.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for g in grads:
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr * m / (v.sqrt() + eps)
        p = p - lr * wd * p
    return p


def test_no_bias_correction_matches_the_formula():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3), torch.randn(3)
    grads_w = [torch.randn(4, 3) for _ in range(3)]
    grads_b = [torch.randn(3) for _ in range(3)]
    pw, pb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    opt = AdamWNoBiasCorrection([{"params": [pw], "weight_decay": 0.01}, {"params": [pb], "weight_decay": 0.0}],
                                lr=0.1, eps=1e-6)
    for gw, gb in zip(grads_w, grads_b):
        pw.grad, pb.grad = gw.clone(), gb.clone()
        opt.step()
    assert torch.allclose(pw, _reference(w, grads_w, 0.1, 0.01, 1e-6), atol=1e-6)
    assert torch.allclose(pb, _reference(b, grads_b, 0.1, 0.0, 1e-6), atol=1e-6)
    # the first step is (1 - beta1) / sqrt(1 - beta2) = 3.16x PyTorch's bias-corrected one
    q1, q2 = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    g = torch.full((5,), 0.5)
    for q, o in ((q1, AdamWNoBiasCorrection([q1], lr=1e-3)), (q2, torch.optim.AdamW([q2], lr=1e-3, eps=1e-6,
                                                                                     weight_decay=0.0))):
        q.grad = g.clone()
        o.step()
    assert (q1 / q2).mean().item() == pytest.approx(0.1 / math.sqrt(0.001), rel=1e-3)
    # state round-trips (resume)
    again = AdamWNoBiasCorrection([pw], lr=0.1)
    again.load_state_dict(AdamWNoBiasCorrection([pw], lr=0.1).state_dict())


@pytest.mark.parametrize("fused", [True, None])
def test_no_bias_correction_with_skipped_steps_and_resume(fused):
    """A parameter without a gradient in some steps keeps its own step count (its update uses no bias correction
    either way), the scheduled settings are what the state dict holds, and a reloaded optimizer continues exactly."""
    torch.manual_seed(1)
    w0, b0 = torch.randn(6, 5), torch.randn(5)
    gw = [torch.randn(6, 5) for _ in range(4)]
    gb = [torch.randn(5) for _ in range(2)]  # b has gradients in steps 1 and 3 only
    pw, pb = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = AdamWNoBiasCorrection([{"params": [pw], "weight_decay": 0.05}, {"params": [pb], "weight_decay": 0.0}],
                                lr=0.05, eps=1e-6, fused=fused)
    for k in range(4):
        pw.grad = gw[k].clone()
        pb.grad = gb[k // 2].clone() if k % 2 == 0 else None
        opt.step()
        if k == 1:  # resume half-way from a state dict
            state = opt.state_dict()
            opt = AdamWNoBiasCorrection([{"params": [pw], "weight_decay": 0.05}, {"params": [pb], "weight_decay": 0.0}],
                                        lr=0.05, eps=1e-6, fused=fused)
            opt.load_state_dict(state)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05] and opt.param_groups[0]["weight_decay"] == 0.05
    assert torch.allclose(pw, _reference(w0, gw, 0.05, 0.05, 1e-6), atol=1e-6)
    assert torch.allclose(pb, _reference(b0, gb, 0.05, 0.0, 1e-6), atol=1e-6)


def test_loads_a_checkpoint_of_the_earlier_hand_written_update():
    """Optimizer states saved before the update ran on PyTorch's kernels (integer steps, groups with only lr,
    betas, eps and weight decay) resume and continue as the formula says."""
    torch.manual_seed(2)
    w0 = torch.randn(4, 4)
    grads = [torch.randn(4, 4) for _ in range(3)]
    m = (1 - 0.9) * grads[0]
    v = (1 - 0.999) * grads[0] ** 2
    p = torch.nn.Parameter(w0 - 0.01 * m / (v.sqrt() + 1e-6))
    p.data -= 0.01 * 0.1 * p.data  # the state after one step of the old class
    old = {"state": {0: {"step": 1, "exp_avg": m.clone(), "exp_avg_sq": v.clone()}},
           "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.1, "params": [0]}]}
    opt = AdamWNoBiasCorrection([{"params": [p], "weight_decay": 0.1}], lr=0.01, eps=1e-6, fused=True)
    opt.load_state_dict(old)
    assert opt.param_groups[0]["fused"]
    for g in grads[1:]:
        p.grad = g.clone()
        opt.step()
    assert torch.allclose(p, _reference(w0, grads, 0.01, 0.1, 1e-6), atol=1e-6)


def test_groups_keep_projections_biases_and_layernorm_out_of_weight_decay():
    model = tiny_bert(layers=1, hidden=32, heads=2, ffn=64)
    proj = build_projections([{"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse",
                               "proj": ["linear", 32, 64]}])
    decay, no_decay = parameter_groups(model, proj, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    assert all(id(p) in ids for p in proj.parameters())
    for name, p in model.named_parameters():
        assert (id(p) in ids) == (p.ndim < 2 or "LayerNorm" in name), name
    ours = build_optimizer([decay, no_decay], 1e-3, 1e-6, False)
    torchs = build_optimizer([decay, no_decay], 1e-3, 1e-8, True)
    assert isinstance(ours, AdamWNoBiasCorrection) and type(torchs) is torch.optim.AdamW
    assert ours.defaults["fused"] and torchs.defaults["fused"]  # PyTorch's fused kernel on the CPU
