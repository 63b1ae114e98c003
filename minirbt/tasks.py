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


@dataclass
class ReadReport:
    path: str
    rows: int = 0
    skipped_unlabelled: int = 0
    skipped_bad: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.path}: {self.rows} examples"
        if self.skipped_unlabelled:
            s += f", {self.skipped_unlabelled} rows without a gold label skipped"
        if self.skipped_bad:
            s += f", {len(self.skipped_bad)} bad rows skipped (first: {self.skipped_bad[0]})"
        return s


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


def read_classification(task: str, path: str | Path) -> tuple[list[Example], ReadReport]:
    if task not in LABELS:
        raise CorpusError(f"unknown task {task!r}: one of {', '.join(LABELS)}")
    path = require_file(path, f"{task} data file")
    report = ReadReport(str(path))
    out: list[Example] = []
    if task in ("ocnli", "afqmc"):
        for n, row in _json_lines(path):
            if "sentence1" not in row or "sentence2" not in row:
                raise CorpusError(f"{path}:{n}: expected sentence1 and sentence2 fields")
            raw = row.get("label", row.get("gold_label"))
            if raw == "-":
                report.skipped_unlabelled += 1
                continue
            out.append(Example(row["sentence1"], row["sentence2"], _label(task, raw, f"{path}:{n}"),
                               str(row.get("id", n))))
    elif task == "tnews":
        for n, row in _json_lines(path):
            if "sentence" not in row:
                raise CorpusError(f"{path}:{n}: expected a sentence field")
            out.append(Example(row["sentence"], None, _label(task, row.get("label"), f"{path}:{n}"),
                               str(row.get("id", n))))
    elif task in ("lcqmc", "bq"):
        with open(path, encoding="utf-8", newline="") as f:
            for n, line in enumerate(f, start=1):
                parts = line.rstrip("\r\n").split("\t")
                if n == 1 and parts[:2] == ["text_a", "text_b"]:
                    continue  # header
                if not line.strip():
                    continue
                if len(parts) not in (2, 3):
                    report.skipped_bad.append(f"line {n}: {len(parts)} tab-separated fields")
                    continue
                label = _label(task, parts[2], f"{path}:{n}") if len(parts) == 3 else None
                out.append(Example(parts[0], parts[1], label, str(n)))
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
                    report.skipped_bad.append(f"record {n}: {len(row)} fields for {len(cols)} columns")
                    continue
                text = row[text_col]
                if not text.strip():
                    report.skipped_bad.append(f"record {n}: empty review")
                    continue
                out.append(Example(text, None, _label(task, row[li], f"{path}:{n}"), str(n)))
    report.rows = len(out)
    if not out:
        raise CorpusError(f"{path}: no examples read for task {task}")
    return out, report


# ------------------------------------------------------------------ reading comprehension
@dataclass
class MRCExample:
    qid: str
    question: str
    context: str
    answers: list[str]
    answer_start: int | None  # of the first answer, None when it does not match the context


def read_squad(path: str | Path) -> tuple[list[MRCExample], ReadReport]:
    path = require_file(path, "reading-comprehension data file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "data" not in data:
        raise CorpusError(f"{path}: expected SQuAD-style JSON with a top-level 'data' list")
    report = ReadReport(str(path))
    out: list[MRCExample] = []
    for doc in data["data"]:
        for para in doc.get("paragraphs", []):
            context = para["context"]
            for qa in para.get("qas", []):
                answers = [a["text"] for a in qa.get("answers", [])]
                start = None
                if qa.get("answers"):
                    first = qa["answers"][0]
                    s = first.get("answer_start")
                    if isinstance(s, int) and context[s : s + len(first["text"])] == first["text"]:
                        start = s
                    else:
                        report.skipped_bad.append(f"{qa['id']}: answer_start {s} does not point at "
                                                  f"{first['text']!r}")
                out.append(MRCExample(str(qa["id"]), qa["question"], context, answers, start))
    report.rows = len(out)
    if not out:
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
