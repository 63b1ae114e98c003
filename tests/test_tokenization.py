"""The fast line tokenizer gives exactly the Hugging Face tokenizer's tokens."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minirbt.textio import CorpusError
from minirbt.tokenization import LineTokenizer, load_tokenizer, token_chars


def hf_tokens(tokenizer, lines):
    return [list(e.tokens) for e in tokenizer.backend_tokenizer.encode_batch(lines, add_special_tokens=True)]


def test_real_chinese_is_tokenized_not_unk(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("自然语言处理很有趣，NLP 2024！")["input_ids"])
    assert tokens[:11] == ["[CLS]", "自", "然", "语", "言", "处", "理", "很", "有", "趣", "，"]
    assert tokens[-2:] == ["！", "[SEP]"]
    assert "[UNK]" not in tokens and "".join(t.lstrip("#") for t in tokens[11:-2]) == "nlp2024"


def test_same_tokens_as_huggingface_on_real_text(tokenizer, real_lines):
    lt = LineTokenizer(tokenizer)
    ours = lt.tokens(real_lines)
    assert ours == hf_tokens(tokenizer, real_lines)
    chars = lt.token_chars(real_lines)
    assert chars == [token_chars(t) for t in ours]
    ids = lt.ids(real_lines[:200])
    assert ids == [tokenizer(x, add_special_tokens=False)["input_ids"] for x in real_lines[:200]]


TRICKY = st.one_of(
    st.sampled_from(list("\u2028\u2029\u0085\x0b\x0c\r\t \u3000\xa0\u200b\ufeff\ufffd\x00é\u0301ＡａＩİﬁ①²[]#"
                         "中文字詞丨𠀀豈\uf900，。！？—…“”《》😀🇨🇳a1Z")),
    st.characters(codec="utf-8"),
    st.sampled_from(["[SEP]", "[MASK]", "[CLS]", "##", "[UNK]", "naïve", "ＮＬＰ"]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(TRICKY, max_size=30).map("".join), min_size=1, max_size=8))
def test_same_tokens_as_huggingface_on_any_unicode(tokenizer, lines):
    lt = LineTokenizer(tokenizer)
    expected = hf_tokens(tokenizer, lines)
    assert lt.tokens(lines) == expected
    got = lt.token_chars(lines)
    assert [g if isinstance(g, str) else token_chars(g) for g in got] == [token_chars(t) for t in expected]


def test_long_words_become_unk(tokenizer):
    lt = LineTokenizer(tokenizer)
    line = "a" * 150 + " 中"
    assert lt.tokens([line]) == hf_tokens(tokenizer, [line])


def test_tokenizer_folder_errors(tmp_path):
    with pytest.raises(CorpusError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="has no vocab.txt"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "english").mkdir()
    (tmp_path / "english" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
    with pytest.raises(CorpusError, match="not a Chinese BERT vocab"):
        load_tokenizer(tmp_path / "english")
