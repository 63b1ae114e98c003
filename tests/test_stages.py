"""The stage contract (minirbt/stages.py): what an output may be, settings that travel with it, done / resume /
refuse / replace, nothing dropped in silence, and messages that tell the truth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_script, tiny_bert

from minirbt import stages
from minirbt.textio import CorpusError

KIND = stages.TRAINING_RUN
REQUEST = {"settings": {"lr": 0.1, "steps": 10}, "inputs": {"data": {"path": "/a", "fingerprint": "f1"}}}


def test_claim_decides_by_record(tmp_path):
    out = tmp_path / "run"
    assert stages.claim(KIND, out, REQUEST).state == "new"  # absent
    out.mkdir()
    assert stages.claim(KIND, out, REQUEST).state == "new"  # empty folder
    stages.write_record(KIND, out, REQUEST, complete=False)
    (out / "checkpoint-1").mkdir()
    with pytest.raises(CorpusError, match="unfinished training run with these settings: add --resume"):
        stages.claim(KIND, out, REQUEST, has_progress=lambda p: True)
    assert stages.claim(KIND, out, REQUEST, resume=True, has_progress=lambda p: True).state == "resume"
    # an unfinished run that kept nothing is started again, whatever its settings were
    other = {"settings": {"lr": 0.2, "steps": 10}, "inputs": REQUEST["inputs"]}
    assert stages.claim(KIND, out, other, has_progress=lambda p: False).state == "replace"
    stages.mark_complete(KIND, out)
    assert stages.claim(KIND, out, REQUEST).state == "done"
    # the same input moved elsewhere (same content) is the same input
    moved = {"settings": REQUEST["settings"], "inputs": {"data": {"path": "/b", "fingerprint": "f1"}}}
    assert stages.claim(KIND, out, moved).state == "done"
    with pytest.raises(CorpusError, match=r"other settings \(lr: 0.1 -> 0.2\): use another --output_dir, or "
                                          r"--overwrite_output"):
        stages.claim(KIND, out, other)
    changed = {"settings": REQUEST["settings"], "inputs": {"data": {"path": "/a", "fingerprint": "f2"}}}
    with pytest.raises(CorpusError, match=r"data \(content\): f1 -> f2"):
        stages.claim(KIND, out, changed)
    assert stages.claim(KIND, out, other, overwrite=True).state == "replace"
    longer = {"settings": {"lr": 0.1, "steps": 20}, "inputs": REQUEST["inputs"]}
    with pytest.raises(CorpusError, match="--resume --accept_changed steps"):
        stages.claim(KIND, out, longer, resume=True, acceptable=("steps",))
    claim = stages.claim(KIND, out, longer, resume=True, accept_changed=["steps"], acceptable=("steps",))
    assert claim.state == "resume" and claim.accepted == (("steps", 10, 20),)
    with pytest.raises(CorpusError, match="only steps may change"):
        stages.claim(KIND, out, longer, resume=True, accept_changed=["lr"], acceptable=("steps",))


def test_claim_refuses_what_is_not_its_own(tmp_path, monkeypatch):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "thesis.tex").write_text("x")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "file.txt").write_text("x")
    other_kind = tmp_path / "ds"
    other_kind.mkdir()
    stages.write_record(stages.DATASET, other_kind, REQUEST, complete=True)
    cases = [
        (tmp_path / "user", [], "holds files this project did not write (thesis.tex)"),
        (tmp_path / "model", [], "a model folder this command did not write"),
        (tmp_path / "file.txt", [], "is an existing file, not a folder"),
        (other_kind, [], "holds a dataset (it has minirbt_dataset.json)"),
        (tmp_path / "model", [("--teacher", tmp_path / "model")], "is the --teacher input"),
        (tmp_path, [("--teacher", tmp_path / "model")], "contains the --teacher input"),
    ]
    for path, inputs, message in cases:
        with pytest.raises(CorpusError, match=message.replace("(", r"\(").replace(")", r"\)")):
            stages.claim(KIND, path, REQUEST, inputs=inputs, overwrite=True)  # even with --overwrite_output
    monkeypatch.chdir(tmp_path / "user")
    with pytest.raises(CorpusError, match="is the current directory"):
        stages.claim(KIND, ".", REQUEST)
    # a file output keeps its record beside it
    ref = tmp_path / "c_ref.txt"
    ref.write_text("[]\n")
    with pytest.raises(CorpusError, match="holds a file this project did not write"):
        stages.claim(stages.REFS_FILE, ref, REQUEST, flag="--output")
    stages.write_record(stages.REFS_FILE, ref, REQUEST, complete=True)
    assert (tmp_path / ".c_ref.txt.minirbt.json").is_file()
    assert stages.claim(stages.REFS_FILE, ref, REQUEST, flag="--output").state == "done"


def test_clear_output_removes_only_what_the_kind_writes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stages.write_record(KIND, out, REQUEST, complete=True)
    for name in ("checkpoint-0000002", "runs"):
        (out / name).mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    (out / "my_notes.md").write_text("kept")
    stages.clear_output(KIND, out, ("checkpoint-*", "runs", "model.safetensors"))
    assert sorted(p.name for p in out.iterdir()) == ["my_notes.md"]


# ------------------------------------------------------------------ training runs through train()
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, vocab_dir, real_lines):
    from minirbt.data import build_pretraining_dataset
    from minirbt.refs import RefBuilder, write_ref_file
    from minirbt.segmentation import make_segmenter
    from minirbt.tokenization import LineTokenizer, load_tokenizer

    d = tmp_path_factory.mktemp("stages")
    (d / "c.txt").write_text("\n".join(real_lines[:300]) + "\n", encoding="utf-8")
    builder = RefBuilder(LineTokenizer(load_tokenizer(vocab_dir)), make_segmenter("jieba"))
    write_ref_file(builder, d / "c.txt", d / "c_ref.txt", progress=False)
    build_pretraining_dataset([d / "c.txt"], [d / "c_ref.txt"], vocab_dir, d / "ds", max_seq_length=64)
    (d / "s.json").write_text(json.dumps(tiny_bert(layers=1, hidden=32, heads=2, ffn=64).config.to_dict()))
    return d


def _args(tiny_teacher, d, out, **kw):
    from minirbt.trainer import DistillArguments

    base = dict(teacher=str(tiny_teacher), dataset=str(d / "ds"), output_dir=str(out), student_config=str(d / "s.json"),
                max_steps=4, batch_size=4, save_steps=2, eval_steps=0, min_teacher_accuracy=0)
    return DistillArguments(**(base | kw))


def test_training_run_done_resumed_longer_or_replaced(tmp_path, tiny_teacher, tiny_setup):
    from minirbt.trainer import train

    out = tmp_path / "run"
    first = train(_args(tiny_teacher, tiny_setup, out))
    weights = (out / "model.safetensors").read_bytes()
    record = stages.read_record(KIND, out)
    assert record["complete"] and record["settings"]["max_steps"] == 4 and "dataset" in record["inputs"]
    # the same request, with other logging/eval cadence: done, nothing rewritten
    again = train(_args(tiny_teacher, tiny_setup, out, logging_steps=1, save_total_limit=1))
    assert again["skipped"] and again["steps"] == first["steps"] == 4
    assert (out / "model.safetensors").read_bytes() == weights
    # continuing to more steps is accepted only when asked, and recorded
    longer = train(_args(tiny_teacher, tiny_setup, out, max_steps=6, resume=True, accept_changed=["max_steps"]))
    assert longer["steps"] == 6 and not longer.get("skipped")
    assert stages.read_record(KIND, out)["changed_on_resume"] == [{"setting": "max_steps", "old": 4, "new": 6}]
    # another seed replaces the run only with --overwrite_output; a user's file in the folder survives
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match=r"seed: 42 -> 7"):
        train(_args(tiny_teacher, tiny_setup, out, max_steps=6, seed=7))
    train(_args(tiny_teacher, tiny_setup, out, max_steps=2, seed=7, overwrite_output=True))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0000002"]
    assert (out / "notes.txt").read_text() == "mine"
    assert stages.read_record(KIND, out)["settings"]["seed"] == 7


def test_ctrl_c_says_what_was_kept(tmp_path, tiny_teacher, tiny_setup):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "pretraining/train.py"), "--teacher", str(tiny_teacher), "--dataset",
           str(tiny_setup / "ds"), "--student_config", str(tiny_setup / "s.json"), "--output_dir", str(out),
           "--max_steps", "100000", "--batch_size", "4", "--save_steps", "3", "--eval_steps", "0",
           "--min_teacher_accuracy", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(out.glob("checkpoint-*/training_state.pt")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    newest = sorted(out.glob("checkpoint-*"))[-1]
    assert last.startswith("interrupted: training stopped during step") and str(newest) in last, last
    assert "re-run with --resume" in last and "Traceback" not in err


def test_stop_without_checkpoint_claims_none(tmp_path, tiny_teacher, tiny_setup):
    from minirbt.checkpoints import pretraining_kept as _kept

    assert "no checkpoint was written yet" in _kept(tmp_path)


# ------------------------------------------------------------------ fine-tuning and the readers
def test_unusable_rows_are_counted_reported_and_refused_beyond_the_share(tmp_path, tiny_teacher, shared_data):
    import csv

    from minirbt.classification import ClassificationArguments as FinetuneArguments
    from minirbt.classification import run_classification

    with open(shared_data / "chnsenticorp" / "ChnSentiCorp_htl_all.csv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["review"].strip()][::101][:60]

    def write(name, part, blank):
        with open(tmp_path / name, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "review"])
            for i, r in enumerate(part):
                w.writerow(["" if i in blank else r["label"], r["review"]])
    write("train.csv", rows[:40], blank={3, 17})
    write("dev.csv", rows[40:], blank=set())
    args = dict(task="chnsenticorp", model=str(tiny_teacher), train_file=str(tmp_path / "train.csv"),
                dev_file=str(tmp_path / "dev.csv"), epochs=1, max_seq_length=32, seeds="1")
    with pytest.raises(CorpusError, match=r"2 of 40 training rows \(5%\) are unusable \(2 no gold label; first: "
                                          r"record 5\), more than --max_unusable_share 0.01"):
        run_classification(FinetuneArguments(**args, output_dir=str(tmp_path / "o"), max_unusable_share=0.01))
    assert not (tmp_path / "o").exists()
    r = run_classification(FinetuneArguments(**args, output_dir=str(tmp_path / "o")))
    assert r["train_examples"] == 38
    assert r["read"]["train"] | {"path": None} == {"path": None, "records": 40, "usable": 38,
                                                   "unusable": {"no gold label": 2},
                                                   "first_unusable": {"no gold label": "record 5"}}
    assert stages.read_record(stages.FINETUNE_RUN, tmp_path / "o")["complete"]
    again = run_classification(FinetuneArguments(**args, output_dir=str(tmp_path / "o")))
    assert again["skipped"] and again["accuracy"] == r["accuracy"]


def test_run_mrc_on_its_defaults(tmp_path, tiny_teacher, shared_data):
    doc = json.loads((shared_data / "cmrc2018" / "trial.json").read_text(encoding="utf-8"))
    (tmp_path / "mrc.json").write_text(json.dumps({"data": doc["data"][:2]}, ensure_ascii=False), encoding="utf-8")
    proc = run_script("finetuning/run_mrc.py", "--task", "cmrc2018", "--model", tiny_teacher, "--train_file",
                      tmp_path / "mrc.json", "--dev_file", tmp_path / "mrc.json", "--output_dir", tmp_path / "o",
                      "--epochs", "1")
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert r["args"]["max_seq_length"] == 512 and r["args"]["doc_stride"] == 128 and "F1" in proc.stdout


def test_refs_cli_skips_what_is_up_to_date(tmp_path, vocab_dir, real_lines):
    (tmp_path / "corpus").mkdir()
    for name, part in (("a.txt", real_lines[:40]), ("b.txt", real_lines[40:60])):
        (tmp_path / "corpus" / name).write_text("\n".join(part) + "\n", encoding="utf-8")
    args = ["--input", tmp_path / "corpus", "--output", tmp_path / "refs", "--tokenizer", vocab_dir,
            "--segmenter", "jieba", "--num_workers", "1"]
    run_script("pretraining/run_chinese_ref.py", *args)
    record = stages.read_record(stages.REFS_FOLDER, tmp_path / "refs")
    assert record["complete"] and record["files"] == ["a_ref.txt", "b_ref.txt"]
    before = {p.name: p.read_bytes() for p in (tmp_path / "refs").iterdir()}
    proc = run_script("pretraining/run_chinese_ref.py", *args)
    assert "up to date" in proc.stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / "refs").iterdir()} == before
    # a changed corpus file is a changed input: refused until --overwrite_output, which rewrites
    with open(tmp_path / "corpus" / "b.txt", "a", encoding="utf-8") as f:
        f.write("新的一行\n")
    proc = run_script("pretraining/run_chinese_ref.py", *args, check=False)
    assert proc.returncode == 2 and "corpus b.txt (content)" in proc.stderr
    run_script("pretraining/run_chinese_ref.py", *args, "--overwrite_output")
    assert len((tmp_path / "refs" / "b_ref.txt").read_text().splitlines()) == 21
    assert os.stat(tmp_path / "refs" / "b_ref.txt").st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "/data/out"),
                                   OSError(28, "No space left on device", "/data/out/x"),
                                   FileNotFoundError(2, "No such file or directory", "/nope")])
def test_os_errors_are_one_line_and_status_2(error, capsys):
    from minirbt.cli import run

    def main():
        raise error

    with pytest.raises(SystemExit) as e:
        run(main)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {error.filename}: {error.strerror}")
