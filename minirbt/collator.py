"""Chinese whole-word masking with refs (what transformers 5's collator no longer does).

For each sequence:

* tokens are grouped into words: a token whose position is in ``chinese_ref``
  continues the word of the token before it, and so does a WordPiece continuation
  (``##ing``, ``##56``: English words and digit runs are masked whole, as in the
  transformers 4.x collator MiniRBT trained with); every other token starts a word.
  Special tokens (``[CLS]``, ``[SEP]``, ``[PAD]``, ...) are never part of a word, so
  a ``##`` piece right after one starts a word of its own.
* words are drawn in random order and taken while they fit, until about
  ``mlm_probability`` of the sequence's non-special tokens are chosen (the rule of
  the BERT / Hugging Face whole-word-mask code: at least one token; a word that
  would overshoot the budget is skipped, a later shorter one may still fit);
* each chosen token becomes ``[MASK]`` with probability 0.8, a random non-special
  token with 0.1, and stays itself with 0.1; ``labels`` hold the original token at
  chosen positions and -100 everywhere else.

Batches are padded to their longest sequence (optionally to a multiple of N).
The collator owns a seeded ``numpy`` generator whose state is saved with training
checkpoints, so masks are reproducible across resumes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


class ChineseWWMCollator:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
    ):
        if not 0 < mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if mask_replace_prob < 0 or random_replace_prob < 0 or mask_replace_prob + random_replace_prob > 1:
            raise ValueError("mask_replace_prob + random_replace_prob must be within [0, 1]")
        self.mlm_probability = mlm_probability
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        special = set(tokenizer.all_special_ids)
        self.special = np.zeros(len(tokenizer), dtype=bool)
        self.special[list(special)] = True
        self.random_ids = np.flatnonzero(~self.special)  # replacements: ordinary tokens only
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.subword = np.array([t.startswith("##") for t in vocab], dtype=bool)
        self.rng = np.random.default_rng(seed)

    # The generator state travels with training checkpoints.
    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    def choose(self, ids: np.ndarray, ref: Sequence[int]) -> np.ndarray:
        """Boolean mask of the positions chosen for prediction in one sequence."""
        n = len(ids)
        special = self.special[ids]
        candidates = np.flatnonzero(~special)
        chosen = np.zeros(n, dtype=bool)
        if len(candidates) == 0:
            return chosen
        cont = self.subword[ids].copy()  # WordPiece continuations join the token before them
        ref = np.asarray(ref, dtype=np.int64)
        ref = ref[(ref > 0) & (ref < n)]
        cont[ref] = True
        cont[0] = False
        cont[1:] &= ~special[:-1]  # a word never continues across a special token
        cont &= ~special
        starts = candidates[~cont[candidates]]
        # word k covers [starts[k], ends[k]) restricted to non-special continuation tokens
        word_of = np.cumsum(~cont & ~special) - 1
        lengths = np.bincount(word_of[candidates], minlength=len(starts))
        budget = max(1, int(round(len(candidates) * self.mlm_probability)))
        order = self.rng.permutation(len(starts))
        taken = np.zeros(len(starts), dtype=bool)
        covered = 0
        for w in order:
            if covered >= budget:
                break
            if covered + lengths[w] > budget:
                continue
            taken[w] = True
            covered += lengths[w]
        chosen[candidates] = taken[word_of[candidates]]
        return chosen

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [np.asarray(e["input_ids"], dtype=np.int64) for e in examples]
        longest = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch = np.full((len(seqs), longest), self.pad_id, dtype=np.int64)
        attention = np.zeros((len(seqs), longest), dtype=np.int64)
        chosen = np.zeros((len(seqs), longest), dtype=bool)
        for i, (s, e) in enumerate(zip(seqs, examples)):
            batch[i, : len(s)] = s
            attention[i, : len(s)] = 1
            chosen[i, : len(s)] = self.choose(s, e.get("chinese_ref") or [])
        labels = np.where(chosen, batch, -100)
        roll = self.rng.random(batch.shape)
        to_mask = chosen & (roll < self.mask_replace_prob)
        to_random = chosen & (roll >= self.mask_replace_prob) & (
            roll < self.mask_replace_prob + self.random_replace_prob)
        inputs = batch.copy()
        inputs[to_mask] = self.mask_id
        inputs[to_random] = self.rng.choice(self.random_ids, size=int(to_random.sum()))
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.from_numpy(attention),
            "token_type_ids": torch.zeros_like(torch.from_numpy(inputs)),
            "labels": torch.from_numpy(labels),
        }
