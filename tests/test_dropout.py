"""The CPU dropout of the distillation student: the stock layer's distribution, its own cheaper masks."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

from minirbt.dropout import CPUDropout, cpu_dropout, use_cpu_dropout


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


def test_follows_the_seed_and_passes_through_in_eval():
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    torch.manual_seed(3)
    a = cpu_dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(a, cpu_dropout(x, 0.1)) and a.dtype == torch.bfloat16
    assert cpu_dropout(x, 0.1, training=False) is x and cpu_dropout(x, 0.0) is x


def test_swaps_the_models_dropout_layers():
    model = tiny_bert(layers=2, hidden=32, heads=2, ffn=64)
    before = sum(type(m) is torch.nn.Dropout for m in model.modules())
    assert use_cpu_dropout(model) == before > 0
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert isinstance(model.bert.embeddings.dropout, CPUDropout)
    assert model.bert.embeddings.dropout.p == model.config.hidden_dropout_prob
    ids = torch.randint(5, 100, (2, 12))
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
    model.train()
    torch.manual_seed(0)
    b = model(input_ids=ids).logits
    torch.manual_seed(0)
    assert torch.equal(b, model(input_ids=ids).logits) and not torch.allclose(a, b)
