"""The Chinese whole-word-mask collator, checked statistically over many batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minirbt.collator import ChineseWWMCollator
from minirbt.refs import RefBuilder
from minirbt.segmentation import make_segmenter
from minirbt.tokenization import LineTokenizer


@pytest.fixture(scope="module")
def examples(tokenizer, real_lines):
    lines = [x.strip() for x in real_lines if x.strip()][:1200]
    refs = RefBuilder(LineTokenizer(tokenizer), make_segmenter("jieba")).refs(lines)
    out = []
    for line, ref in zip(lines, refs):
        ids = tokenizer(line, truncation=True, max_length=128)["input_ids"]
        out.append({"input_ids": ids, "chinese_ref": [r for r in ref if r < len(ids) - 1]})
    return out


def words_of(ids, ref, special):
    """Word id per position from refs (None for special tokens)."""
    word, w = [], -1
    refs = set(ref)
    for i, t in enumerate(ids):
        if t in special:
            word.append(None)
            continue
        if not (i in refs and i > 0 and word[i - 1] is not None):
            w += 1
        word.append(w)
    return word


def test_wordpiece_continuations_are_never_chosen_without_their_head(tokenizer, examples):
    """English words and digit runs split into ## pieces are masked whole (the transformers 4.x rule MiniRBT
    trained with): over many batches of real mixed text, no chosen ## piece lacks its chosen predecessor."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    mixed = [e for e in examples if any(vocab[t].startswith("##") for t in e["input_ids"])]
    assert len(mixed) > 50  # real text with Latin words and numbers
    collator = ChineseWWMCollator(tokenizer, 0.15, seed=3)
    pieces = orphans = heads_special = 0
    for start in range(0, 40 * 32, 32):
        batch = [mixed[(start + k) % len(mixed)] for k in range(32)]
        chosen = (collator(batch)["labels"] != -100).numpy()
        for row, e in zip(chosen, batch):
            ids = e["input_ids"]
            for i in np.flatnonzero(row[: len(ids)]):
                if vocab[ids[i]].startswith("##"):
                    pieces += 1
                    if ids[i - 1] in special:
                        heads_special += 1
                    elif not row[i - 1]:
                        orphans += 1
    assert pieces > 300, pieces
    assert orphans == 0, f"{orphans} of {pieces} chosen ## pieces without their head"


def test_statistics_over_many_batches(tokenizer, examples):
    collator = ChineseWWMCollator(tokenizer, seed=123)
    special = set(tokenizer.all_special_ids)
    chosen_total = ordinary_total = masked = randomised = kept = 0
    for start in range(0, len(examples), 32):
        group = examples[start : start + 32]
        batch = collator(group)
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        longest = max(len(e["input_ids"]) for e in group)
        assert batch["input_ids"].shape == (len(group), longest)  # dynamic padding
        for i, e in enumerate(group):
            ids = np.array(e["input_ids"])
            n = len(ids)
            labels = batch["labels"][i].numpy()
            inputs = batch["input_ids"][i].numpy()
            assert (batch["attention_mask"][i].numpy() == (np.arange(longest) < n)).all()
            assert (labels[n:] == -100).all() and (inputs[n:] == tokenizer.pad_token_id).all()
            chosen = labels != -100
            assert (labels[chosen] == ids[chosen[:n]]).all()  # labels are the original tokens
            assert not any(ids[j] in special for j in np.flatnonzero(chosen))  # never special tokens
            word = words_of(ids.tolist(), e["chinese_ref"], special)
            for w in {word[j] for j in np.flatnonzero(chosen)}:  # every chosen word chosen whole
                members = [j for j in range(n) if word[j] == w]
                assert chosen[members].all()
            ordinary = sum(1 for t in ids if t not in special)
            chosen_total += chosen.sum()
            ordinary_total += ordinary
            assert chosen.sum() <= max(1, round(0.15 * ordinary))
            sel = np.flatnonzero(chosen)
            masked += (inputs[sel] == tokenizer.mask_token_id).sum()
            kept += (inputs[sel] == ids[sel]).sum()
            randomised += ((inputs[sel] != ids[sel]) & (inputs[sel] != tokenizer.mask_token_id)).sum()
            assert not any(t in special and t != tokenizer.mask_token_id for t in inputs[sel])  # random: ordinary
            assert (inputs[:n][~chosen[:n]] == ids[~chosen[:n]]).all()  # nothing else changed
    rate = chosen_total / ordinary_total
    assert 0.14 <= rate <= 0.151, rate
    assert abs(masked / chosen_total - 0.8) < 0.02
    # a random replacement can draw the original token (1 in 21k): counted as kept
    assert abs(randomised / chosen_total - 0.1) < 0.015
    assert abs(kept / chosen_total - 0.1) < 0.015


def test_words_are_masked_whole_on_a_hand_made_example(tokenizer):
    ids = tokenizer("我们喜欢自然语言处理")["input_ids"]  # [CLS] 我 们 喜 欢 自 然 语 言 处 理 [SEP]
    ref = [2, 4, 6, 7, 8, 10]  # 我们 喜欢 自然语言 处理
    words = {1: (1, 2), 3: (3, 4), 5: (5, 6, 7, 8), 9: (9, 10)}
    collator = ChineseWWMCollator(tokenizer, mlm_probability=0.4, seed=0)
    seen = set()
    for _ in range(200):
        labels = collator([{"input_ids": ids, "chinese_ref": ref}])["labels"][0]
        chosen = tuple(int(i) for i in torch.nonzero(labels != -100).flatten())
        assert len(chosen) <= 4 and chosen
        parts = [w for w in words.values() if set(w) <= set(chosen)]
        assert sorted(j for w in parts for j in w) == list(chosen)
        seen.add(chosen)
    assert len(seen) > 3  # the choice varies


def test_seeded_and_resumable(tokenizer, examples):
    a = ChineseWWMCollator(tokenizer, seed=7)
    b = ChineseWWMCollator(tokenizer, seed=7)
    first = a(examples[:8])
    assert torch.equal(first["input_ids"], b(examples[:8])["input_ids"])
    state = a.state_dict()
    nxt = a(examples[8:16])
    c = ChineseWWMCollator(tokenizer, seed=99)
    c.load_state_dict(state)
    assert torch.equal(nxt["labels"], c(examples[8:16])["labels"])


def test_pad_to_multiple_and_bad_arguments(tokenizer, examples):
    batch = ChineseWWMCollator(tokenizer, pad_to_multiple_of=64)(examples[:3])
    assert batch["input_ids"].shape[1] % 64 == 0
    with pytest.raises(ValueError):
        ChineseWWMCollator(tokenizer, mlm_probability=0)
    with pytest.raises(ValueError):
        ChineseWWMCollator(tokenizer, mask_replace_prob=0.95, random_replace_prob=0.1)
