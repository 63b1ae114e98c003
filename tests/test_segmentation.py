"""Segmenters: a locally trained LTP perceptron, neural LTP under transformers 5, jieba."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from minirbt.segmentation import make_segmenter
from minirbt.textio import CorpusError
from minirbt.tokenization import save_tokenizer


def test_trained_ltp_segments_real_text(ltp_dir):
    seg = make_segmenter("ltp", ltp_dir)
    assert not seg.neural
    words = seg.segment(["中国人民银行今天发布公告。", "", "我们喜欢自然语言处理"])
    assert "".join(words[0]) == "中国人民银行今天发布公告。" and words[1] == []
    assert "今天" in words[0] and "公告" in words[0] and "喜欢" in words[2]
    info = json.loads((ltp_dir / "training.json").read_text())
    assert info["train_sentences"] > 18_000


def tiny_neural_ltp(folder, hidden=32):
    """A random-weight neural LTP folder in LTP's own format (its models are on a hub)."""
    from ltp_core.models.utils import instantiate

    save_tokenizer(folder)
    config = {
        "nerual": True,
        "model": {
            "_ltp_target_": "ltp_core.models.ltp_model.LTPModule",
            "backbone": {"_ltp_target_": "ltp_core.models.utils.transformer.load_transformers",
                         "config": {"model_type": "bert", "vocab_size": 21128, "hidden_size": hidden,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}},
            "processor": {"cws": {"_ltp_target_": "ltp_core.models.processor.TokenOnly"}},
            "heads": {"cws": {"_ltp_target_": "ltp_core.models.components.token.MLPTokenClassifier",
                              "input_size": hidden, "num_labels": 2}},
        },
        "vocabs": {"cws": ["I-W", "B-W"]},
    }
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(instantiate(config["model"]).state_dict(), folder / "pytorch_model.bin")
    return folder


def test_neural_ltp_works_under_transformers_5(tmp_path):
    from ltp import LTP

    folder = tiny_neural_ltp(tmp_path / "neural")
    with contextlib.redirect_stdout(io.StringIO()):
        raw = LTP(str(folder))
    with pytest.raises(AttributeError, match="batch_encode_plus"):
        raw.pipeline(["他叫汤姆去拿外衣。"], tasks=["cws"])  # what transformers 5 broke
    seg = make_segmenter("ltp", folder, batch_size=2)
    assert seg.neural
    lines = ["他叫汤姆去拿外衣。", "中国人民银行", "今天天气很好", "自然语言"]
    words = seg.segment(lines)
    assert [("".join(w)) for w in words] == lines  # a segmentation partitions each line


def test_jieba_user_dictionary(tmp_path):
    line = "蓝翔技校的挖掘机专业"
    plain = make_segmenter("jieba").segment([line])[0]
    user = tmp_path / "dict.txt"
    user.write_text("挖掘机专业 100000 n\n", encoding="utf-8")
    custom = make_segmenter("jieba", user_dict=str(user)).segment([line])[0]
    assert "挖掘机专业" in custom and "挖掘机专业" not in plain
    with pytest.raises(CorpusError, match="user dictionary not found"):
        make_segmenter("jieba", user_dict=str(tmp_path / "missing.txt"))


def test_ltp_needs_a_folder():
    with pytest.raises(CorpusError, match="needs --ltp_model"):
        make_segmenter("ltp", None)
