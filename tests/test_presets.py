"""Every preset name shared with MiniRBT or TextBrewer means what it means there.

The reference tables are transcribed from MiniRBT's ``pretraining/matches.py`` and TextBrewer's
``examples/matches/matches.py`` (layer pairs, loss, weight, projection). Hidden layer 0 is the embeddings in all
three. Attention layers: this project and TextBrewer's tables count from 1 (teacher 3, 6, 9, 12 -> student
1..4); MiniRBT's ``L4_attention_mse`` is written 0-based (2, 5, 8, 11 -> 0..3, the indices of Hugging Face's
attention tuple), which is the same mapping.
"""

from __future__ import annotations

from minirbt.matches import PRESETS


def _hidden(pairs, proj=None, loss="hidden_mse", paired=False):
    out = []
    for t, s in pairs:
        m = {"layer_T": [t, t] if paired else t, "layer_S": [s, s] if paired else s, "feature": "hidden",
             "loss": loss, "weight": 1}
        if proj:
            m["proj"] = ["linear", proj, 768]
        out.append(m)
    return out


def _att(pairs, loss, zero_based=False):
    shift = 1 if zero_based else 0
    return [{"layer_T": t + shift, "layer_S": s + shift, "feature": "attention", "loss": loss, "weight": 1}
            for t, s in pairs]


L3 = [(0, 0), (4, 1), (8, 2), (12, 3)]
L4 = [(0, 0), (3, 1), (6, 2), (9, 3), (12, 4)]
L6 = [(0, 0), (2, 1), (4, 2), (6, 3), (8, 4), (10, 5), (12, 6)]
SAME6 = [(i, i) for i in range(7)]

TEXTBREWER = {
    **{f"L3_{loss}": _att(L3[1:], loss) for loss in ("attention_mse", "attention_ce", "attention_mse_sum",
                                                      "attention_ce_mean")},
    **{f"L4_{loss}": _att(L4[1:], loss) for loss in ("attention_mse", "attention_ce", "attention_mse_sum",
                                                      "attention_ce_mean")},
    "L3_hidden_smmd": _hidden(L3, loss="mmd", paired=True),
    "L3n_hidden_mse": _hidden(L3, proj=384),
    "L3_hidden_mse": _hidden(L3),
    "L4_hidden_smmd": _hidden(L4, loss="mmd", paired=True),
    "L4t_hidden_sgram": _hidden(L4, proj=312, loss="gram", paired=True),
    "L4t_hidden_mse": _hidden(L4, proj=312),
    "L6_hidden_smmd": _hidden(L6, loss="mmd", paired=True),
    "L6_hidden_mse": _hidden(L6),
}
MINIRBT = {
    **{k: v for k, v in TEXTBREWER.items() if k != "L4_attention_mse"},
    "L4_attention_mse": _att([(2, 0), (5, 1), (8, 2), (11, 3)], "attention_mse", zero_based=True),
    "L4_hidden_mse": _hidden([(i, i) for i in range(5)], proj=312),
    "L6h256_roberta_hidden_mse": _hidden(L6, proj=256),
    "L6n0_hidden_mse": _hidden(L6, proj=288),
    "L6h256_rbt6_hidden_mse": _hidden(SAME6, proj=256),
    "L6h288_rbt6_hidden_mse": _hidden(SAME6, proj=288),
}


def test_shared_preset_names_mean_the_same_mapping():
    for source, table in (("TextBrewer", TEXTBREWER), ("MiniRBT", MINIRBT)):
        for name, expected in table.items():
            assert name in PRESETS, f"{source}'s preset {name} is missing"
            assert PRESETS[name] == expected, f"{name} differs from {source}'s"


def test_project_names_that_differ_are_not_theirs():
    own = set(PRESETS) - set(TEXTBREWER) - set(MINIRBT)
    assert own == {"L12_L6_hidden_mse", "L12_L6_hidden_mse_H256", "L12_L6_hidden_mse_H288", "L6_L6_hidden_mse_H256",
                   "L6_L6_hidden_mse_H288", "L12_L4_hidden_mse_H312", "L12_L4_hidden_mse",
                   "L6_minilmv2_H256", "L6_minilmv2_H288", "L12_L6_minilmv2_H256"}
    # MiniLMv2's relations are our own presets (neither TextBrewer nor MiniRBT ships them): last layers only
    for name, layer_t in (("L6_minilmv2_H256", 6), ("L6_minilmv2_H288", 6), ("L12_L6_minilmv2_H256", 12)):
        assert {(m["relation"], m["layer_T"], m["layer_S"]) for m in PRESETS[name]} == \
            {(r, layer_t, 6) for r in ("query", "key", "value")}
    assert PRESETS["L6_L6_hidden_mse_H256"] == MINIRBT["L6h256_rbt6_hidden_mse"]
    assert PRESETS["L12_L6_hidden_mse_H288"] == MINIRBT["L6n0_hidden_mse"]
