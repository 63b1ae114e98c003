"""Stages 1-2 through the command lines on real text from ../shared/data, both segmenters."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import run_script

from minirbt.collator import ChineseWWMCollator
from minirbt.data import load_pretraining_dataset
from minirbt.textio import count_lines, iter_lines


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("real") / "train_files"
    d.mkdir()
    with open(shared_data / "chnsenticorp" / "ChnSentiCorp_htl_all.csv", encoding="utf-8", newline="") as f:
        reviews = [row["review"] or "" for row in csv.DictReader(f)][:800]
    # reviews keep their inner newlines: each becomes lines of the corpus, as a user's export would
    (d / "chnsenticorp.txt").write_text("\n".join(reviews) + "\n", encoding="utf-8")
    with open(shared_data / "ocnli" / "dev.json", encoding="utf-8") as f:
        rows = [json.loads(x) for x in list(f)[:600]]
    (d / "ocnli.txt").write_text("\n".join(r["sentence1"] + "\n" + r["sentence2"] for r in rows), encoding="utf-8")
    doc = json.loads((shared_data / "cmrc2018" / "dev.json").read_text(encoding="utf-8"))
    contexts = [p["context"] for x in doc["data"][:80] for p in x["paragraphs"]]
    (d / "cmrc2018.txt").write_text("\n".join(contexts) + "\n", encoding="utf-8")
    return d


@pytest.mark.parametrize("segmenter", ["jieba", "ltp"])
def test_refs_then_dataset_on_real_text(segmenter, corpus_dir, vocab_dir, ltp_dir, tokenizer, tmp_path):
    refs = tmp_path / "ref_files"
    run_script("pretraining/run_chinese_ref.py", "--input", corpus_dir, "--output", refs, "--tokenizer", vocab_dir,
               "--segmenter", segmenter, "--ltp_model", ltp_dir)
    files = sorted(corpus_dir.iterdir())
    ref_files = [refs / f"{f.stem}_ref.txt" for f in files]
    for f, r in zip(files, ref_files):
        assert count_lines(f) == count_lines(r)
    total_refs = sum(len(json.loads(x)) for r in ref_files for x in iter_lines(r))
    assert total_refs > 20_000

    out = tmp_path / "dataset"
    proc = run_script("pretraining/my_datasets.py", "--train_file", *files[:2], "--train_ref_file", *ref_files[:2],
                      "--dev_file", files[2], "--dev_ref_file", ref_files[2], "--tokenizer", vocab_dir,
                      "--max_seq_length", "256", "--output_dir", out)
    assert "train:" in proc.stdout and "validation:" in proc.stdout
    ds = load_pretraining_dataset(out)
    manifest = json.loads((out / "minirbt_dataset.json").read_text())
    for split in ("train", "validation"):
        rows = ds[split]
        assert sum(len(x) - 2 for x in rows["input_ids"]) == manifest["splits"][split]["tokens"]
        assert all(len(x) == 256 for x in rows["input_ids"][:-1])
        for x, ref in zip(rows["input_ids"], rows["chinese_ref"]):
            assert all(1 < r < len(x) - 1 for r in ref)
    n_refs = sum(len(r) for split in ds.values() for r in split["chinese_ref"])
    assert n_refs > 0.97 * total_refs  # only refs at chunk starts are dropped
    batch = ChineseWWMCollator(tokenizer, seed=0)([ds["train"][i] for i in range(16)])
    chosen = (batch["labels"] != -100).sum().item()
    assert 0.13 < chosen / (16 * 254) < 0.16
