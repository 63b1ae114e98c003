"""Stage 2: chunked dataset, refs re-based, cache reuse, clear errors."""

from __future__ import annotations

import json

import pytest
from conftest import run_script

from minirbt.data import build_pretraining_dataset, load_pretraining_dataset
from minirbt.refs import RefBuilder, write_ref_file
from minirbt.segmentation import make_segmenter
from minirbt.textio import CorpusError, iter_lines
from minirbt.tokenization import LineTokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer, real_lines):
    """Real lines (with blank ones and a very long one) and their jieba refs."""
    d = tmp_path_factory.mktemp("corpus")
    lines = real_lines[:1500] + ["", "  "] + ["非常长的一行文字。" * 300] + real_lines[1500:2000]
    train, dev = d / "train.txt", d / "dev.txt"
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dev.write_text("\n".join(real_lines[2000:2300]) + "\n", encoding="utf-8")
    builder = RefBuilder(LineTokenizer(tokenizer), make_segmenter("jieba"))
    for f in (train, dev):
        write_ref_file(builder, f, d / f"{f.stem}_ref.txt", num_workers=1, progress=False)
    return d


def line_level(corpus, tokenizer, name):
    ids, refs = [], []
    for line, ref in zip(iter_lines(corpus / f"{name}.txt"), iter_lines(corpus / f"{name}_ref.txt")):
        toks = tokenizer(line.strip(), add_special_tokens=False)["input_ids"]
        ids.append(toks)
        refs.append(json.loads(ref))
    return ids, refs


def test_chunks_concatenate_lines_and_rebase_refs(corpus, tokenizer, vocab_dir, tmp_path):
    out = tmp_path / "ds"
    manifest = build_pretraining_dataset([corpus / "train.txt"], [corpus / "train_ref.txt"], vocab_dir, out,
                                         max_seq_length=64, dev_files=[corpus / "dev.txt"],
                                         dev_refs=[corpus / "dev_ref.txt"], num_workers=2)
    ds = load_pretraining_dataset(out)
    assert set(ds) == {"train", "validation"} and manifest["reused"] is False
    for split, name in (("train", "train"), ("validation", "dev")):
        ids, refs = line_level(corpus, tokenizer, name)
        stream = [t for line in ids for t in line]
        # global positions (0-based in the stream) that continue a word
        starts = [0]
        for line in ids:
            starts.append(starts[-1] + len(line))
        cont = {starts[i] + r - 1 for i, ref in enumerate(refs) for r in ref}
        chunks = ds[split]
        got, offset = [], 0
        for k, row in enumerate(chunks):
            x = row["input_ids"]
            assert x[0] == tokenizer.cls_token_id and x[-1] == tokenizer.sep_token_id
            assert len(x) == 64 or k == len(chunks) - 1  # only the last chunk is shorter
            body = x[1:-1]
            got.extend(body)
            expected_ref = [p - offset + 1 for p in sorted(cont) if offset < p < offset + len(body)]
            assert row["chinese_ref"] == expected_ref
            offset += len(body)
        assert got == stream  # nothing dropped, nothing reordered
        assert manifest["splits"][split]["tokens"] == len(stream)


def test_rerun_reuses_and_change_needs_overwrite(corpus, vocab_dir, tmp_path):
    args = ([corpus / "dev.txt"], [corpus / "dev_ref.txt"], vocab_dir, tmp_path / "ds")
    assert build_pretraining_dataset(*args, max_seq_length=32)["reused"] is False
    assert build_pretraining_dataset(*args, max_seq_length=32)["reused"] is True
    with pytest.raises(CorpusError, match=r"made with other settings \(max_seq_length: 32 -> 48\).*--overwrite_output"):
        build_pretraining_dataset(*args, max_seq_length=48)
    assert len(load_pretraining_dataset(tmp_path / "ds")["train"][0]["input_ids"]) == 32  # untouched
    assert build_pretraining_dataset(*args, max_seq_length=48, overwrite=True)["reused"] is False
    assert len(load_pretraining_dataset(tmp_path / "ds")["train"][0]["input_ids"]) == 48


def test_legacy_refs_for_non_blank_lines_align(tmp_path, tokenizer, vocab_dir):
    text = tmp_path / "t.txt"
    text.write_text("今天天气很好\n\n我们去公园散步\n", encoding="utf-8")
    legacy = tmp_path / "t_ref.txt"  # MiniRBT's script wrote refs for non-blank lines only
    legacy.write_text("[2, 4, 6]\n[2, 5, 7]\n")
    m = build_pretraining_dataset([text], [legacy], vocab_dir, tmp_path / "ds", max_seq_length=64)
    assert m["splits"]["train"]["alignment"] == ["non-blank lines"]
    row = load_pretraining_dataset(tmp_path / "ds")["train"][0]
    assert row["chinese_ref"] == [2, 4, 6, 6 + 2, 6 + 5, 6 + 7]


@pytest.mark.parametrize("case", ["count", "outside", "not_json", "missing", "empty", "no_vocab", "dev_ref_only"])
def test_clear_errors(case, tmp_path, vocab_dir):
    text = tmp_path / "t.txt"
    text.write_text("今天天气很好\n我们去公园\n", encoding="utf-8")
    ref = tmp_path / "t_ref.txt"
    ref.write_text("[2]\n[3]\n")
    tok = vocab_dir
    kwargs = {}
    expected = {
        "count": "has 1 refs but .*t.txt has 2 lines",
        "outside": r"ref position 9 for .*t.txt:2 is outside the line's 5 tokens",
        "not_json": r"ref for .*t.txt:1 is not JSON",
        "missing": "train corpus file not found",
        "empty": "train corpus file is empty",
        "no_vocab": "has no vocab.txt",
        "dev_ref_only": "--dev_ref_file given without --dev_file",
    }[case]
    if case == "count":
        ref.write_text("[2]\n")
    elif case == "outside":
        ref.write_text("[2]\n[9]\n")
    elif case == "not_json":
        ref.write_text("2, 3\n[3]\n")
    elif case == "missing":
        text = tmp_path / "nope.txt"
    elif case == "empty":
        text.write_text("")
    elif case == "no_vocab":
        tok = tmp_path / "novocab"
        tok.mkdir()
    elif case == "dev_ref_only":
        kwargs = {"dev_refs": [ref]}
    with pytest.raises(CorpusError, match=expected):
        build_pretraining_dataset([text], [ref], tok, tmp_path / "ds", max_seq_length=16, **kwargs)
    assert not (tmp_path / "ds").exists()


def test_cli_with_miniRBT_data_json(corpus, vocab_dir, tmp_path):
    spec = {"train": [str(corpus / "dev.txt")], "train_ref": [str(corpus / "dev_ref.txt")],
            "dev": [str(corpus / "dev.txt")], "dev_ref": [str(corpus / "dev_ref.txt")]}
    (tmp_path / "data.json").write_text(json.dumps(spec))
    proc = run_script("pretraining/my_datasets.py", "--data_files_json", tmp_path / "data.json",
                      "--tokenizer", vocab_dir, "--max_seq_length", "128", "--output_dir", tmp_path / "ds")
    assert "validation:" in proc.stdout and "written" in proc.stdout
    proc = run_script("pretraining/my_datasets.py", "--data_files_json", tmp_path / "data.json",
                      "--tokenizer", vocab_dir, "--max_seq_length", "128", "--output_dir", tmp_path / "ds")
    assert "up to date, reused" in proc.stdout
    ds = load_pretraining_dataset(tmp_path / "ds")
    assert ds["train"]["input_ids"] == ds["validation"]["input_ids"]


def test_cli_error_is_one_line(tmp_path, vocab_dir):
    proc = run_script("pretraining/my_datasets.py", "--train_file", tmp_path / "x.txt", "--train_ref_file",
                      tmp_path / "x_ref.txt", "--tokenizer", vocab_dir, "--output_dir", tmp_path / "ds", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: train corpus file not found")
    assert "Traceback" not in proc.stderr
