"""Shared fixtures: a real Chinese vocab, a locally trained LTP model, real text."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def fresh_fault_counters():
    """``MINIRBT_FAULT`` counts arrivals per process; tests share one process, so each starts from zero."""
    from minirbt import faults

    faults._hits.clear()
    yield
    faults._hits.clear()


def run_script(script: str, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the project's command-line scripts the way a user does."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data missing: {SHARED_DATA} (the checkout needs ../shared beside it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory) -> Path:
    from minirbt.tokenization import save_tokenizer

    return save_tokenizer(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="session")
def tokenizer(vocab_dir):
    from minirbt.tokenization import load_tokenizer

    return load_tokenizer(vocab_dir)


@pytest.fixture(scope="session")
def ltp_dir(tmp_path_factory) -> Path:
    """An LTP perceptron CWS model trained here (1 epoch on People's Daily 1998)."""
    from minirbt.segmentation import train_ltp_cws

    out = tmp_path_factory.mktemp("ltp") / "ltp_cws"
    train_ltp_cws(out, epochs=1)
    return out


@pytest.fixture(scope="session")
def real_lines(shared_data) -> list[str]:
    """Reviews, NLI sentences and reading-comprehension contexts: ~4,000 real lines."""
    lines: list[str] = []
    with open(shared_data / "chnsenticorp" / "ChnSentiCorp_htl_all.csv", encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i % 5 == 0:
                lines += (row["review"] or "").split("\n")
    with open(shared_data / "ocnli" / "dev.json", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i % 3 == 0:
                row = json.loads(line)
                lines += [row["sentence1"], row["sentence2"]]
    doc = json.loads((shared_data / "cmrc2018" / "trial.json").read_text(encoding="utf-8"))
    for d in doc["data"][:60]:
        for p in d["paragraphs"]:
            lines.append(p["context"].replace("\n", " "))
            lines += [q["question"] for q in p["qas"]]
    return lines


def tiny_bert(layers: int = 4, hidden: int = 64, heads: int = 4, ffn: int = 128, seed: int = 0, std: float = 0.02):
    """A small random BertForMaskedLM with the real 21,128-token vocab."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=21128, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=512, initializer_range=std)
    return BertForMaskedLM(config)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 4-layer, 64-wide teacher folder (weights with a wide init: peaked, varied predictions)."""
    from minirbt.modeling import save_model_folder
    from minirbt.tokenization import default_vocab_path

    out = tmp_path_factory.mktemp("teacher") / "teacher"
    save_model_folder(tiny_bert(std=0.2), default_vocab_path(), out)
    return out


def pretraining_dataset(lines: list[str], vocab_dir: Path, folder: Path, max_seq_length: int = 64,
                        dev_lines: list[str] | None = None) -> Path:
    """``lines`` (and ``dev_lines``) as a corpus file in ``folder``, its jieba whole-word-mask refs, and the chunked
    Arrow dataset ``folder/ds`` built from them, as stages 1 and 2 make it."""
    from minirbt.data import build_pretraining_dataset
    from minirbt.refs import RefBuilder, write_ref_file
    from minirbt.segmentation import make_segmenter
    from minirbt.tokenization import LineTokenizer, load_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    builder = RefBuilder(LineTokenizer(load_tokenizer(vocab_dir)), make_segmenter("jieba"))
    parts = {"train": lines, **({"dev": dev_lines} if dev_lines else {})}
    for name, part in parts.items():
        (folder / f"{name}.txt").write_text("\n".join(part) + "\n", encoding="utf-8")
        write_ref_file(builder, folder / f"{name}.txt", folder / f"{name}_ref.txt", progress=False)
    dev = {"dev_files": [folder / "dev.txt"], "dev_refs": [folder / "dev_ref.txt"]} if dev_lines else {}
    build_pretraining_dataset([folder / "train.txt"], [folder / "train_ref.txt"], vocab_dir, folder / "ds",
                              max_seq_length=max_seq_length, **dev)
    return folder / "ds"
