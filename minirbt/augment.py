"""TinyBERT-style data augmentation for Chinese task distillation (``run_classification.py --augment N``).

Every training example gets N variants in which words (jieba/LTP segmentation) are replaced, with
probability p, by a masked LM's predictions for the whole word (all its characters masked at once,
the top ``candidates`` kept). The variants carry no gold label: the teacher labels them.
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm
from transformers import BertForMaskedLM

from minirbt.finetune import quiet_load
from minirbt.refs import is_cjk_word
from minirbt.tasks import Example
from minirbt.tokenization import load_tokenizer


def word_proposals(text: str, segmenter, tokenizer, mlm, vocab: list[str], candidates: int, device,
                   max_length: int) -> list[tuple[str, list[str]]]:
    """Each word of ``text`` with the replacements the MLM proposes for it (whole word masked)."""
    spans = segmenter.segment([text])[0]
    todo = [i for i, w in enumerate(spans) if 1 <= len(w) <= 4 and is_cjk_word(w)]
    props: dict[int, list[str]] = {i: [] for i in todo}
    if todo:
        masked = ["".join("[MASK]" * len(w) if j == i else w for j, w in enumerate(spans)) for i in todo]
        enc = tokenizer(masked, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        is_mask = enc["input_ids"] == tokenizer.mask_token_id
        with torch.no_grad():
            hidden = mlm.bert(**{k: v.to(device) for k, v in enc.items()}).last_hidden_state
            # the vocabulary projection only at the masked positions
            top = mlm.cls(hidden[is_mask.to(device)]).topk(candidates, dim=-1).indices.tolist()
        k = 0
        for row, i in enumerate(todo):
            n_mask = int(is_mask[row].sum())
            rows_top, k = top[k : k + n_mask], k + n_mask
            if n_mask != len(spans[i]):
                continue  # truncated away
            for r in range(candidates):
                cand = "".join(vocab[t[r]] for t in rows_top)
                if cand != spans[i] and is_cjk_word(cand):
                    props[i].append(cand)
    return [(w, props.get(i, [])) for i, w in enumerate(spans)]


def augment_examples(examples: list[Example], n: int, prob: float, mlm_dir: str, segmenter, seed: int,
                     candidates: int = 15, device="cpu", max_length: int = 128) -> list[Example]:
    """``n`` unlabelled variants of every example, in order (``guid-aug``)."""
    tokenizer = load_tokenizer(mlm_dir)
    mlm = quiet_load(BertForMaskedLM, mlm_dir).to(device).eval()
    rng = random.Random(seed)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out: list[Example] = []

    def proposals(text: str) -> list[tuple[str, list[str]]]:
        return word_proposals(text, segmenter, tokenizer, mlm, vocab, candidates, device, max_length)

    def sample(p: list[tuple[str, list[str]]]) -> str:
        return "".join(rng.choice(c) if c and rng.random() < prob else w for w, c in p)

    for ex in tqdm(examples, desc="augmenting", leave=False):
        pa = proposals(ex.text_a)
        pb = proposals(ex.text_b) if ex.text_b is not None else None
        for _ in range(n):
            out.append(Example(sample(pa), sample(pb) if pb is not None else None, None, ex.guid + "-aug"))
    return out
