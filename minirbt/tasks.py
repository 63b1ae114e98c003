"""CLUE tasks: readers for each data set's native format, and the official metrics.

Classification and sentence-pair tasks read into ``Example(text_a, text_b, label)``;
reading comprehension (CMRC 2018, DRCD: SQuAD v1 JSON) into ``MRCExample``.
Bad rows are counted and reported, never silently dropped: OCNLI's unlabelled
``"-"`` rows and MRC answers whose ``answer_start`` does not point at the answer.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from minirbt.textio import CorpusError, require_file

LABELS: dict[str, list[str]] = {
    "chnsenticorp": ["0", "1"],
    "ocnli": ["entailment", "neutral", "contradiction"],
    "lcqmc": ["0", "1"],
    "bq": ["0", "1"],
    "afqmc": ["0", "1"],
    "tnews": ["100", "101", "102", "103", "104", "106", "107", "108", "109", "110", "112", "113", "114", "115",
              "116"],
}
PAIR_TASKS = {"ocnli", "lcqmc", "bq", "afqmc"}
# Fine-tuning learning rates MiniRBT recommends (README): RoBERTa 2e-5/3e-5; small models 1e-4, OCNLI 5e-5
SMALL_MODEL_LR = {"ocnli": 5e-5}


@dataclass
class Example:
    text_a: str
    text_b: str | None
    label: int | None  # None: unlabelled (test sets)
    guid: str = ""


# Unusable rows: the readers' reasons (counted, reported, never dropped in silence).
NO_LABEL = "no gold label"
BAD_FIELDS = "wrong number of fields"
EMPTY_TEXT = "empty text"
BAD_ANSWER = "answer_start does not point at the answer"
NO_ANSWER = "no answer"


@dataclass
class ReadReport:
    """What a reader made of a file: records read, usable ones, and the unusable ones by reason."""

    path: str
    records: int = 0
    usable: int = 0
    unusable: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)  # reason -> where it first happened

    def skip(self, reason: str, where: str) -> None:
        self.unusable[reason] = self.unusable.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    @property
    def rows(self) -> int:  # usable rows (the examples returned)
        return self.usable

    def summary(self) -> str:
        s = f"{self.path}: {self.usable} usable examples of {self.records}"
        if self.unusable:
            s += "; unusable: " + ", ".join(f"{n} {reason} (first: {self.first[reason]})"
                                             for reason, n in self.unusable.items())
        return s

    def as_dict(self) -> dict:
        return {"path": self.path, "records": self.records, "usable": self.usable, "unusable": dict(self.unusable),
                "first_unusable": dict(self.first)}

    def check(self, max_share: float, what: str, flag: str = "--max_unusable_share") -> None:
        """Refuse a file with no usable rows, or with more than ``max_share`` of its rows unusable."""
        if not self.usable:
            raise CorpusError(f"{self.path}: no usable {what} examples ({self.summary().split(': ', 1)[1]})")
        share = (self.records - self.usable) / max(self.records, 1)
        if share > max_share:
            reasons = ", ".join(f"{n} {r}" for r, n in self.unusable.items())
            raise CorpusError(f"{self.path}: {self.records - self.usable} of {self.records} {what} rows "
                              f"({100 * share:.0f}%) are unusable ({reasons}; first: {next(iter(self.first.values()))}"
                              f"), more than {flag} {max_share:g}: fix the file, or raise {flag} to use the "
                              f"{self.usable} usable rows")


def _label(task: str, raw, where: str) -> int | None:
    if raw is None or raw == "":
        return None
    raw = str(raw).strip()
    labels = LABELS[task]
    if raw not in labels:
        raise CorpusError(f"{where}: label {raw!r} is not one of {task}'s labels {labels}")
    return labels.index(raw)


def _json_lines(path: Path) -> Iterable[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{n}: not a JSON line ({e})") from None


def read_classification(task: str, path: str | Path, keep_unlabelled: bool = False
                        ) -> tuple[list[Example], ReadReport]:
    """The examples of a task file and what was made of it. Rows without a gold label (OCNLI's ``-``, an empty
    or missing label) are counted as unusable, or kept with ``label=None`` when ``keep_unlabelled`` (a test
    file, or training data a teacher will label)."""
    if task not in LABELS:
        raise CorpusError(f"unknown task {task!r}: one of {', '.join(LABELS)}")
    path = require_file(path, f"{task} data file")
    report = ReadReport(str(path))
    out: list[Example] = []

    def add(text_a: str, text_b: str | None, raw_label, where: str, guid: str) -> None:
        report.records += 1
        if not text_a.strip() or (text_b is not None and not text_b.strip()):
            report.skip(EMPTY_TEXT, where)
            return
        label = None if raw_label == "-" else _label(task, raw_label, f"{path}:{where.removeprefix('line ')}")
        if label is None and not keep_unlabelled:
            report.skip(NO_LABEL, where)
            return
        out.append(Example(text_a, text_b, label, guid))

    if task in ("ocnli", "afqmc", "tnews"):
        for n, row in _json_lines(path):
            fields = ("sentence",) if task == "tnews" else ("sentence1", "sentence2")
            if not all(isinstance(row.get(k), str) for k in fields):
                raise CorpusError(f"{path}:{n}: expected text fields {' and '.join(fields)}")
            raw = row.get("label", row.get("gold_label"))
            add(row[fields[0]], row[fields[1]] if len(fields) > 1 else None, raw, f"line {n}", str(row.get("id", n)))
    elif task in ("lcqmc", "bq"):
        with open(path, encoding="utf-8", newline="") as f:
            for n, line in enumerate(f, start=1):
                parts = line.rstrip("\r\n").split("\t")
                if n == 1 and parts[:2] == ["text_a", "text_b"]:
                    continue  # header
                if not line.strip():
                    continue
                if len(parts) not in (2, 3):
                    report.records += 1
                    report.skip(BAD_FIELDS, f"line {n}: {len(parts)} tab-separated fields")
                    continue
                add(parts[0], parts[1], parts[2] if len(parts) == 3 else None, f"line {n}", str(n))
    else:  # chnsenticorp: CSV "label,review" (quoted fields may hold commas and newlines) or TSV "label\ttext_a"
        with open(path, encoding="utf-8", newline="") as f:
            head = f.readline()
            f.seek(0)
            delimiter = "\t" if "\t" in head else ","
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise CorpusError(f"{path}: empty")
            cols = [c.strip().lower() for c in header]
            text_col = next((cols.index(c) for c in ("review", "text_a", "text") if c in cols), None)
            if "label" not in cols or text_col is None:
                raise CorpusError(f"{path}: expected a header with 'label' and 'review' (or 'text_a'), got {header}")
            li = cols.index("label")
            for n, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(cols):
                    report.records += 1
                    report.skip(BAD_FIELDS, f"record {n}: {len(row)} fields for {len(cols)} columns")
                    continue
                add(row[text_col], None, row[li], f"record {n}", str(n))
    report.usable = len(out)
    if not report.records:
        raise CorpusError(f"{path}: no rows found for task {task}")
    return out, report


# ------------------------------------------------------------------ reading comprehension
@dataclass
class MRCExample:
    qid: str
    question: str
    context: str
    answers: list[str]
    answer_start: int | None  # of the first answer, None when it does not match the context


def read_squad(path: str | Path, training: bool = False,
               keep_unanswered: bool = False) -> tuple[list[MRCExample], ReadReport]:
    """SQuAD v1-style questions. Unusable and counted: a question without an answer (kept, with no answers, for
    ``keep_unanswered``: a test file to predict); for ``training``, also one whose first answer's
    ``answer_start`` does not point at its text (there is no span to learn)."""
    path = require_file(path, "reading-comprehension data file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise CorpusError(f"{path}: expected SQuAD-style JSON with a top-level 'data' list")
    report = ReadReport(str(path))
    out: list[MRCExample] = []
    for d, doc in enumerate(data["data"]):
        for p, para in enumerate(doc.get("paragraphs", []) if isinstance(doc, dict) else []):
            if not isinstance(para, dict) or not isinstance(para.get("context"), str):
                raise CorpusError(f"{path}: data[{d}].paragraphs[{p}] has no context string")
            context = para["context"]
            for q, qa in enumerate(para.get("qas", [])):
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or "id" not in qa:
                    raise CorpusError(f"{path}: data[{d}].paragraphs[{p}].qas[{q}] lacks a question or an id")
                report.records += 1
                answers = [a.get("text") for a in qa.get("answers", []) if isinstance(a, dict)]
                answers = [a for a in answers if isinstance(a, str) and a.strip()]
                if not answers and keep_unanswered and not training:
                    out.append(MRCExample(str(qa["id"]), qa["question"], context, [], None))
                    continue
                if not answers:
                    report.skip(NO_ANSWER, str(qa["id"]))
                    continue
                first = qa["answers"][0]
                s = first.get("answer_start")
                start = s if isinstance(s, int) and context[s : s + len(first["text"])] == first["text"] else None
                if start is None and training:
                    report.skip(BAD_ANSWER, f"{qa['id']}: answer_start {s} for {first['text']!r}")
                    continue
                out.append(MRCExample(str(qa["id"]), qa["question"], context, answers, start))
    report.usable = len(out)
    if not report.records:
        raise CorpusError(f"{path}: no questions found")
    return out, report


# The official CMRC 2018 evaluation (cmrc2018_evaluate.py): punctuation list, mixed
# segmentation (CJK characters one by one, other runs as words), longest common
# substring for F1, exact match after removing punctuation, max over gold answers.
# nltk.word_tokenize, used there for the non-Chinese runs, needs data downloads;
# here those runs are split into word and number tokens and single symbols, which
# is what it does to them (English words and numbers are kept whole).
_SP_CHAR = {"-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=", "，", "。", "：", "？", "！", "“", "”", "；", "’",
            "《", "》", "……", "·", "、", "「", "」", "（", "）", "－", "～", "『", "』"}
_CJK = re.compile(r"[\u4e00-\u9fa5]")
_WORDS = re.compile(r"\w+|[^\w\s]")


def mixed_segmentation(text: str, rm_punc: bool = False) -> list[str]:
    text = str(text).lower().strip()
    segs: list[str] = []
    temp = ""
    for ch in text:
        if rm_punc and ch in _SP_CHAR:
            continue
        if _CJK.search(ch) or ch in _SP_CHAR:
            if temp:
                segs.extend(_WORDS.findall(temp))
                temp = ""
            segs.append(ch)
        else:
            temp += ch
    if temp:
        segs.extend(_WORDS.findall(temp))
    return segs


def remove_punctuation(text: str) -> str:
    return "".join(ch for ch in str(text).lower().strip() if ch not in _SP_CHAR)


def _lcs_len(a: list[str], b: list[str]) -> int:
    best = 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def cmrc_f1(answers: list[str], prediction: str) -> float:
    scores = []
    pred = mixed_segmentation(prediction, rm_punc=True)
    for ans in answers:
        gold = mixed_segmentation(ans, rm_punc=True)
        n = _lcs_len(gold, pred)
        if n == 0:
            scores.append(0.0)
            continue
        p, r = n / len(pred), n / len(gold)
        scores.append(2 * p * r / (p + r))
    return max(scores) if scores else 0.0


def cmrc_em(answers: list[str], prediction: str) -> float:
    pred = remove_punctuation(prediction)
    return float(any(remove_punctuation(a) == pred for a in answers))


def cmrc_score(examples: list[MRCExample], predictions: dict[str, str]) -> dict:
    """EM and F1 in percent over all questions (a missing prediction scores 0)."""
    em = f1 = 0.0
    for ex in examples:
        pred = predictions.get(ex.qid)
        if pred is None:
            continue
        em += cmrc_em(ex.answers, pred)
        f1 += cmrc_f1(ex.answers, pred)
    n = max(len(examples), 1)
    return {"em": 100 * em / n, "f1": 100 * f1 / n, "total": len(examples)}
