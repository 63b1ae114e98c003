"""The CPU dropout of the distillation student: the stock layer's distribution, its own cheaper masks."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

from minirbt.dropout import ATTENTION, CPUDropout, cpu_dropout, keep_mask, use_cpu_dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_scale_and_gradient(p):
    torch.manual_seed(0)
    x = torch.randn(400, 500, requires_grad=True)
    y = cpu_dropout(x, p)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.005  # 200,000 draws: ~5 standard deviations
    assert torch.allclose(y[kept], x[kept] / (1 - p))
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept.float() / (1 - p))  # gradient flows through the kept elements only


def test_mask_halves_are_independent_draws_at_the_rounded_rate():
    """Two elements share one 31-bit draw: each must still drop at round(p * 2**15) / 2**15, independently of
    its neighbour (both halves of a pair, and an odd length's last element)."""
    torch.manual_seed(1)
    n = 1_000_001
    for p in (0.1, 0.5):
        keep = keep_mask(torch.Size([n]), p)
        assert keep.shape == (n,) and keep.dtype == torch.float32
        dropped = 1 - keep.double()
        rate = round(p * 2**15) / 2**15
        sd = (rate * (1 - rate) / (n // 2)) ** 0.5
        even, odd = dropped[0:-1:2], dropped[1::2]
        assert abs(even.mean() - rate) < 5 * sd and abs(odd.mean() - rate) < 5 * sd
        assert abs((even * odd).mean() - rate**2) < 5 * sd  # P(both) = P(one)^2: independent halves
    assert keep_mask(torch.Size([3, 5]), 1e-6).eq(1).all()  # below 2**-16: rounds to never


@pytest.mark.parametrize("p", [1e-6, 2**-15, 0.1, 0.5, 1 - 2**-15, 1 - 1e-6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_is_the_draw_below_threshold_rule(p, dtype):
    """The 0/1 values (int16 arithmetic, no comparison) are exactly "keep when the 15-bit draw >= threshold",
    for the same draws, at the edges of the threshold's range too."""
    torch.manual_seed(7)
    keep = keep_mask(torch.Size([33, 31]), p, dtype)  # odd count: the last draw's second half unused
    torch.manual_seed(7)
    draws = torch.empty((33 * 31 + 1) // 2, dtype=torch.int32).random_()
    halves = draws.view(torch.int16)[: 33 * 31].int() & (2**15 - 1)
    expected = (halves >= round(p * 2**15)).to(dtype).view(33, 31)
    assert keep.dtype == dtype and torch.equal(keep, expected)


def test_follows_the_seed_and_passes_through_in_eval():
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    torch.manual_seed(3)
    a = cpu_dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(a, cpu_dropout(x, 0.1)) and a.dtype == torch.bfloat16
    assert cpu_dropout(x, 0.1, training=False) is x and cpu_dropout(x, 0.0) is x


def _inputs():
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # padding: the attention kernel takes SDPA's masks
    return {"input_ids": ids, "attention_mask": mask}


def test_swaps_the_models_dropout_layers_and_attention():
    model = tiny_bert(layers=2, hidden=32, heads=2, ffn=64).eval()
    with torch.no_grad():
        stock = model(**_inputs()).logits
    before = sum(type(m) is torch.nn.Dropout for m in model.modules())
    assert use_cpu_dropout(model) == before > 0
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert isinstance(model.bert.embeddings.dropout, CPUDropout) and not model.bert.embeddings.dropout.training
    assert model.bert.embeddings.dropout.p == model.config.hidden_dropout_prob
    assert model.config._attn_implementation == ATTENTION
    with torch.no_grad():
        assert torch.equal(model(**_inputs()).logits, stock)  # eval: SDPA as before
    model.train()
    torch.manual_seed(0)
    b = model(**_inputs()).logits
    torch.manual_seed(0)
    assert torch.equal(b, model(**_inputs()).logits) and not torch.allclose(stock, b)


def test_attention_math_with_dropout_matches_eager():
    """The kernel's math path (taken in training on the CPU) against transformers' eager attention: at p = 0 the
    two give the same outputs and gradients, the only difference with p > 0 being the masks."""
    torch.manual_seed(0)
    eager = tiny_bert(layers=2, hidden=32, heads=2, ffn=64)
    eager.set_attn_implementation("eager")
    ours = tiny_bert(layers=2, hidden=32, heads=2, ffn=64)
    use_cpu_dropout(ours)
    for model in (eager, ours):
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    # p = 0 would take SDPA's own path: force the math path with a tiny p on the probabilities only
    for layer in ours.bert.encoder.layer:
        layer.attention.self.dropout.p = 1e-9
    out_e, out_o = eager(**_inputs()).logits, ours(**_inputs()).logits
    assert torch.allclose(out_e, out_o, atol=1e-5)
    out_e.square().mean().backward()
    out_o.square().mean().backward()
    for (name, p_e), p_o in zip(eager.named_parameters(), ours.parameters()):
        assert torch.allclose(p_e.grad, p_o.grad, atol=1e-6), name
