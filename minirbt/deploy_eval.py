"""A task's dev (or test) set scored on any model-like object: PyTorch, ONNX fp32, ONNX int8.

Used by the export (``scripts/export_onnx.py --dev_file``) and the demo's deployment
rows. Reading, encoding and the metrics are the fine-tuning scripts' own
(:mod:`minirbt.classification`, :mod:`minirbt.mrc`, :mod:`minirbt.tasks`), so an
accuracy here is the accuracy ``run_classification.py`` reports for the same model.
A folder that is a fine-tuning run's ``best/`` brings its run's task and sequence
length (its ``results.json``) unless given.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from minirbt.tasks import LABELS
from minirbt.textio import CorpusError

MRC_TASKS = ("cmrc2018", "drcd")
EVAL_BATCH = 32


def run_settings(folder: Path) -> dict:
    """The settings of the fine-tuning run whose ``best/`` this folder is ({} when it is not one)."""
    results = folder.parent / "results.json"
    if folder.name != "best" or not results.is_file():
        return {}
    try:
        return json.loads(results.read_text(encoding="utf-8")).get("args", {}) or {}
    except (OSError, json.JSONDecodeError):
        return {}


@dataclass
class DevSet:
    task: str  # a classification task of LABELS, or cmrc2018 / drcd
    path: str
    rows: list[dict]
    gold: object  # classification: label array; mrc: the examples
    pad_id: int
    settings: dict  # what changes the scores: max_seq_length (+ MRC windowing)
    read: dict

    @classmethod
    def from_args(cls, folder: Path, head: str, dev_file: str, dev_task: str | None,
                  max_seq_length: int | None) -> DevSet:
        from minirbt.tokenization import load_tokenizer

        recorded = run_settings(folder)
        task = dev_task or recorded.get("task")
        if task is None:
            raise CorpusError(f"--dev_task is needed to read --dev_file {dev_file} ({folder} is not the best/ "
                              f"folder of a fine-tuning run that would say): one of {', '.join(LABELS)}, "
                              f"{', '.join(MRC_TASKS)}")
        expected = "mrc" if task in MRC_TASKS else "classification"
        if task not in LABELS and task not in MRC_TASKS:
            raise CorpusError(f"--dev_task must be one of {', '.join(LABELS)}, {', '.join(MRC_TASKS)}, got {task!r}")
        if head != expected:
            raise CorpusError(f"--dev_task {task} scores a {expected} head, but the model is exported as {head}")
        tokenizer = load_tokenizer(folder)
        length = max_seq_length or recorded.get("max_seq_length") or (512 if expected == "mrc" else 128)
        if expected == "classification":
            return cls._classification(task, dev_file, tokenizer, length)
        return cls._mrc(task, dev_file, tokenizer, length, recorded)

    @classmethod
    def _classification(cls, task: str, path: str, tokenizer, length: int) -> DevSet:
        from minirbt.classification import encode
        from minirbt.tasks import read_classification

        examples, report = read_classification(task, path)
        if not examples:
            raise CorpusError(f"--dev_file {path}: no labelled rows to score ({report.summary()})")
        gold = np.array([e.label for e in examples])
        return cls(task, path, encode(tokenizer, examples, length), gold, tokenizer.pad_token_id,
                   {"max_seq_length": length}, report.as_dict())

    @classmethod
    def _mrc(cls, task: str, path: str, tokenizer, length: int, recorded: dict) -> DevSet:
        from minirbt.mrc import MRCArguments, check_windows, mrc_features
        from minirbt.tasks import read_squad

        examples, report = read_squad(path)
        if not examples:
            raise CorpusError(f"--dev_file {path}: no answered questions to score ({report.summary()})")
        defaults = {f: MRCArguments.__dataclass_fields__[f].default for f in
                    ("doc_stride", "max_answer_length", "n_best")}
        windows = SimpleNamespace(max_seq_length=length, **{k: recorded.get(k, v) for k, v in defaults.items()})
        check_windows(tokenizer, examples, windows)
        rows = mrc_features(tokenizer, examples, windows, train=False)
        return cls(task, path, rows, examples, tokenizer.pad_token_id, vars(windows), report.as_dict())

    @property
    def metric(self) -> str:
        return "f1" if self.task in MRC_TASKS else "accuracy"

    def describe(self) -> dict:
        n = len(self.gold)
        return {"task": self.task, "file": str(self.path), "examples": n, **self.settings}

    @torch.no_grad()
    def score(self, model) -> dict[str, float]:
        """accuracy (classification) or EM/F1 (MRC, the official CMRC 2018 scorer) of ``model`` on this set."""
        from minirbt.finetune import predict

        out = predict(model, self.rows, self.pad_id, EVAL_BATCH, torch.device("cpu"), nullcontext())
        model.eval()  # predict() leaves a PyTorch model in training mode
        if self.task not in MRC_TASKS:
            return {"accuracy": float((out.argmax(-1) == self.gold).mean())}
        from minirbt.mrc import decode
        from minirbt.tasks import cmrc_score

        starts, ends = out
        spans = decode(self.gold, self.rows, starts, ends, self.settings["n_best"],
                       self.settings["max_answer_length"])
        score = cmrc_score(self.gold, spans)
        return {"em": float(score["em"]), "f1": float(score["f1"])}

    @staticmethod
    def changes(scores: dict[str, dict[str, float]]) -> dict[str, float]:
        """int8 minus PyTorch fp32, per metric (points for MRC, fractions for accuracy); {} without int8."""
        if "onnx_int8" not in scores:
            return {}
        return {m: scores["onnx_int8"][m] - scores["torch_fp32"][m] for m in scores["torch_fp32"]}
