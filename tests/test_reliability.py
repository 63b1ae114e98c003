"""The fault suite: kills, full disks, non-finite losses, untrusted files (README, Reliability)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script, tiny_bert
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from minirbt.modeling import load_config, load_mlm, save_model_folder
from minirbt.textio import CorpusError
from minirbt.tokenization import default_vocab_path


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file when unpickled


def test_malicious_pickle_weights_do_not_execute(tmp_path):
    folder = tmp_path / "evil"
    save_model_folder(tiny_bert(layers=1, hidden=32, heads=2, ffn=64), default_vocab_path(), folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"bert.embeddings.word_embeddings.weight": _Exploit(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CorpusError, match="cannot load"):
        load_mlm(folder)
    assert not marker.exists()


def test_no_trust_remote_code_anywhere():
    hits = subprocess.run(["grep", "-rn", "trust_remote_code=True", "--include=*.py", "minirbt", "pretraining",
                           "finetuning", "scripts", "bench"], cwd=ROOT, capture_output=True, text=True).stdout
    assert hits == ""


def test_non_finite_loss_stops_naming_step_and_term(tmp_path, tiny_teacher, vocab_dir, real_lines):
    from conftest import pretraining_dataset

    from minirbt.trainer import DistillArguments, train

    bad = tmp_path / "nan_teacher"
    save_model_folder(load_mlm(tiny_teacher), default_vocab_path(), bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["cls.predictions.bias"][:] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    dataset = pretraining_dataset(real_lines[:200], vocab_dir, tmp_path / "corpus")
    cfg = tmp_path / "s.json"
    cfg.write_text(json.dumps(tiny_bert(layers=1, hidden=32, heads=2, ffn=64).config.to_dict()))
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=r"non-finite loss at step 1: term kd"):
        train(DistillArguments(teacher=str(bad), dataset=str(dataset), output_dir=str(out),
                               student_config=str(cfg), max_steps=4, batch_size=4, save_steps=2, eval_steps=0,
                               min_teacher_accuracy=0))
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


# ------------------------------------------------------------------ distillation: kills, full disk, NaN
@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, vocab_dir, tokenizer, real_lines):
    from minirbt.data import build_pretraining_dataset
    from minirbt.refs import RefBuilder, write_ref_file
    from minirbt.segmentation import make_segmenter
    from minirbt.tokenization import LineTokenizer

    d = tmp_path_factory.mktemp("fault_data")
    (d / "c.txt").write_text("\n".join(x for x in real_lines[:600] if x.strip()) + "\n", encoding="utf-8")
    write_ref_file(RefBuilder(LineTokenizer(tokenizer), make_segmenter("jieba")), d / "c.txt", d / "c_ref.txt",
                   progress=False)
    build_pretraining_dataset([d / "c.txt"], [d / "c_ref.txt"], vocab_dir, d / "ds", max_seq_length=64)
    cfg = d / "student.json"
    cfg.write_text(json.dumps(tiny_bert(layers=1, hidden=32, heads=2, ffn=64).config.to_dict()))
    return d / "ds", cfg


def _train_cmd(teacher, ds, cfg, out, steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "pretraining/train.py"), "--teacher", str(teacher), "--dataset", str(ds),
            "--output_dir", str(out), "--student_config", str(cfg), "--mlm_weight", "1", "--max_steps", str(steps),
            "--batch_size", "4", "--learning_rate", "1e-3", "--save_steps", "3", "--save_total_limit", "2",
            "--eval_steps", "0", "--seed", "7", "--min_teacher_accuracy", "0"]


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_distillation_killed_anywhere_resumes_to_the_same_weights(tmp_path, tiny_teacher, small_dataset):
    """SIGKILL inside checkpoint writes (fault points) and at random moments; each time --resume; same result."""
    from minirbt.checkpoints import checkpoints

    ds, cfg = small_dataset
    steps = 60  # enough that three kills, each a little after a new checkpoint, cannot reach the end
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(tiny_teacher, ds, cfg, straight, steps), check=True, capture_output=True)

    out = tmp_path / "killed"
    cmd = _train_cmd(tiny_teacher, ds, cfg, out, steps) + ["--resume"]
    # 1. killed while the 2nd checkpoint's files are half written (model saved, training state not yet)
    proc = subprocess.run(cmd, env=dict(os.environ, MINIRBT_FAULT="checkpoint.model:2:kill"), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in checkpoints(out)] == ["checkpoint-0000003"]  # the half-written one is not picked up
    assert list(out.glob(".checkpoint-0000006.tmp-*"))  # it is there, under its hidden temporary name
    # 2. killed after the training state is written, before the rename
    proc = subprocess.run(cmd, env=dict(os.environ, MINIRBT_FAULT="checkpoint.state:1:kill"), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in checkpoints(out)] == ["checkpoint-0000003"]
    # 3. killed at random moments, each soon after some new checkpoint landed
    rng = random.Random(0)
    for _ in range(3):
        before = checkpoints(out)[-1].name
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and checkpoints(out)[-1].name == before:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "minirbt_training.json").exists(), "the run finished before the last kill"
    subprocess.run(cmd, check=True, capture_output=True)
    a, b = _weights(straight), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


LOADER = r"""
import sys, time, torch
from minirbt.data import load_pretraining_dataset
from minirbt.pretrain_setup import DistillArguments
from minirbt.step_batches import step_loader
from minirbt.tokenization import load_tokenizer
ds, vocab, cfg = sys.argv[1:4]
args = DistillArguments(dataset=ds, output_dir="unused", tokenizer=vocab, student_config=cfg, batch_size=4,
                        max_steps=10**6, dataloader_workers=2)
batches = iter(step_loader(load_pretraining_dataset(ds)["train"], load_tokenizer(vocab), args, 0, 1, 0,
                           torch.device("cpu")))
next(batches)
print(*[w.pid for w in batches._workers], flush=True)
time.sleep(600)
"""


def test_dataloader_workers_end_with_a_killed_training_process(small_dataset, vocab_dir):
    """The workers come from a forkserver, not from the training process; a SIGKILL of the training process
    still ends them (they would otherwise wait forever, holding its output pipes)."""
    ds, cfg = small_dataset
    proc = subprocess.Popen([sys.executable, "-c", LOADER, str(ds), str(vocab_dir), str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    # training on the CPU, the workers run below it in the scheduler (they share its cores)
    niced = [min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)] * 2
    deadline = time.time() + 30  # the second worker may still be starting
    while [os.getpriority(os.PRIO_PROCESS, p) for p in pids] != niced and time.time() < deadline:
        time.sleep(0.1)
    assert [os.getpriority(os.PRIO_PROCESS, p) for p in pids] == niced
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), f"workers {pids} outlived the training process"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, tiny_teacher, small_dataset):
    from minirbt.checkpoints import STATE_NAME, checkpoints

    ds, cfg = small_dataset
    out = tmp_path / "out"
    proc = subprocess.run(_train_cmd(tiny_teacher, ds, cfg, out, 9), capture_output=True, text=True,
                          env=dict(os.environ, MINIRBT_FAULT="checkpoint.model:2:enospc"))
    assert proc.returncode == 2
    assert "could not write the checkpoint of step 6" in proc.stderr and "No space left on device" in proc.stderr
    assert "checkpoint-0000003" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in checkpoints(out)] == ["checkpoint-0000003"]
    assert not list(out.glob(".checkpoint-*"))  # the failed temporary folder was removed
    state = torch.load(out / "checkpoint-0000003" / STATE_NAME, weights_only=True)
    assert state["step"] == 3 and load_mlm(out / "checkpoint-0000003", "checkpoint") is not None
    subprocess.run(_train_cmd(tiny_teacher, ds, cfg, out, 9) + ["--resume"], check=True, capture_output=True)
    assert (out / "minirbt_training.json").is_file()


def test_skip_nonfinite_steps_never_writes_nan_weights(tmp_path, tiny_teacher, small_dataset):
    from minirbt.trainer import DistillArguments, train

    ds, cfg = small_dataset
    bad = tmp_path / "nan_teacher"
    save_model_folder(load_mlm(tiny_teacher), default_vocab_path(), bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["cls.predictions.bias"][:3] = float("nan")  # 3 NaN logits make every softmax NaN
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    args = dict(teacher=str(bad), dataset=str(ds), student_config=str(cfg), max_steps=6, batch_size=4,
                save_steps=6, eval_steps=0, on_nonfinite="skip", seed=1, min_teacher_accuracy=0)
    summary = train(DistillArguments(output_dir=str(tmp_path / "skip"), **args))
    assert summary["skipped_steps"] == list(range(1, 7))  # every batch sees the NaN logits of tokens 0..2
    final = _weights(tmp_path / "skip")
    assert all(torch.isfinite(v).all() for v in final.values())
    torch.manual_seed(1)  # the trainer seeds the random init with --seed: nothing was applied since
    from transformers import BertForMaskedLM

    init = BertForMaskedLM(load_config(cfg)).state_dict()
    assert all(torch.equal(final[k], init[k]) for k in final)
    with pytest.raises(CorpusError, match=r"more than --max_skipped_steps 2"):
        train(DistillArguments(output_dir=str(tmp_path / "limit"), max_skipped_steps=2, **args))


# ------------------------------------------------------------------ fine-tuning: kills
def test_finetuning_killed_anywhere_resumes_to_the_same_results(tmp_path, shared_data):
    import csv

    with open(shared_data / "chnsenticorp" / "ChnSentiCorp_htl_all.csv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["review"].strip()]
    random.Random(0).shuffle(rows)
    for name, part in (("train", rows[:160]), ("dev", rows[160:240])):
        body = "".join(f"{r['label']}\t{' '.join(r['review'].split())[:100]}\n" for r in part)
        (tmp_path / f"{name}.tsv").write_text("label\ttext_a\n" + body, encoding="utf-8")
    model = tmp_path / "model"
    save_model_folder(tiny_bert(layers=1, hidden=32, heads=2, ffn=64, seed=3), default_vocab_path(), model)

    def cmd(out):
        return [sys.executable, str(ROOT / "finetuning/run_classification.py"), "--task", "chnsenticorp",
                "--model", str(model), "--train_file", str(tmp_path / "train.tsv"), "--dev_file",
                str(tmp_path / "dev.tsv"), "--test_file", str(tmp_path / "dev.tsv"), "--output_dir", str(out),
                "--epochs", "3", "--batch_size", "16", "--max_seq_length", "64", "--seeds", "1,2",
                "--learning_rate", "1e-3", "--resume"]

    subprocess.run(cmd(tmp_path / "straight"), check=True, capture_output=True)
    out = tmp_path / "killed"
    for fault in ("finetune.checkpoint:2:kill", "finetune.checkpoint:3:kill"):  # inside checkpoint writes
        proc = subprocess.run(cmd(out), env=dict(os.environ, MINIRBT_FAULT=fault), capture_output=True)
        assert proc.returncode == -signal.SIGKILL
        assert not (out / "results.json").exists() and not (out / "best").exists()
        assert list((out / "checkpoints").glob(".seed-*.tmp-*"))  # the half-written one, hidden
    proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (out / "checkpoints" / "seed-2-epoch-1").is_dir():
        time.sleep(0.01)
    time.sleep(random.Random(1).uniform(0.0, 0.2))  # a random moment of seed 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists(), "finished before the kill"
    done = subprocess.run(cmd(out), check=True, capture_output=True, text=True)
    assert "seed 1: finished earlier" in done.stdout

    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    for x, y in zip(a["per_seed"], b["per_seed"], strict=True):
        assert x["accuracy"] == y["accuracy"] and x["history"] == y["history"]
        assert x["test_accuracy"] == y["test_accuracy"]
    wa, wb = _weights(tmp_path / "straight" / "best"), _weights(out / "best")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (out / "checkpoints").exists()  # removed once results.json is written


# ------------------------------------------------------------------ alignment: refs -> dataset -> collator
_ODD = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x00", "\x1f", "\u0301", "\u200b", "\ufeff", "\t", " ",
        "\udc80", "\udcff", "😀", "，", "。", "Ａ", "１"]  # separators, controls, combining, surrogate-escaped bytes
_LINE = st.text(st.one_of(st.characters(min_codepoint=0x4E00, max_codepoint=0x4E80),
                          st.sampled_from(list("中国人民银行今天天气很好我们")), st.sampled_from(_ODD),
                          st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",))),
                max_size=40)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(st.one_of(_LINE, _LINE.map(lambda s: s * 30)), min_size=1, max_size=8))
def test_alignment_never_drifts(lines, tmp_path_factory, vocab_dir, tokenizer):
    from minirbt.collator import ChineseWWMCollator
    from minirbt.data import build_pretraining_dataset, load_pretraining_dataset
    from minirbt.refs import RefBuilder, write_ref_file
    from minirbt.segmentation import make_segmenter
    from minirbt.textio import iter_lines
    from minirbt.tokenization import LineTokenizer

    d = tmp_path_factory.mktemp("align")
    corpus = d / "c.txt"
    corpus.write_bytes(b"".join(x.encode("utf-8", "surrogateescape") + b"\n" for x in lines))
    decoded = list(iter_lines(corpus, errors="replace"))  # escaped bytes -> U+FFFD, as the stages read them
    assert len(decoded) == len(lines)
    write_ref_file(RefBuilder(LineTokenizer(tokenizer), make_segmenter("jieba")), corpus, d / "r.txt",
                   errors="replace", progress=False)
    refs = [json.loads(x) for x in (d / "r.txt").read_text().split("\n")[:-1]]
    assert len(refs) == len(lines)  # one ref per line
    stream, global_refs = [], set()
    for text, ref in zip(decoded, refs):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert all(1 <= p <= len(ids) for p in ref)  # inside the line's tokens ([CLS] = 0)
        global_refs |= {len(stream) + p - 1 for p in ref}
        stream += ids

    if not stream:  # only blank lines: a clear error, no dataset
        with pytest.raises(CorpusError, match="has no tokens"):
            build_pretraining_dataset([corpus], [d / "r.txt"], vocab_dir, d / "ds", max_seq_length=16,
                                      errors="replace")
        assert not (d / "ds").exists()
        return
    build_pretraining_dataset([corpus], [d / "r.txt"], vocab_dir, d / "ds", max_seq_length=16, errors="replace")
    chunks = list(load_pretraining_dataset(d / "ds")["train"])
    assert [t for c in chunks for t in c["input_ids"][1:-1]] == stream  # nothing dropped, nothing moved
    start = 0
    for c in chunks:
        body = len(c["input_ids"]) - 2
        mapped = {start + p - 1 for p in c["chinese_ref"]}
        assert all(1 <= p <= body for p in c["chinese_ref"])
        # the chunk's refs are the global ones inside it (a continuation cut from its word head becomes a head)
        assert mapped == {g for g in global_refs if start < g < start + body}
        start += body

    collator = ChineseWWMCollator(tokenizer, seed=0)
    batch = collator(chunks)
    special = set(tokenizer.all_special_ids)
    for i, c in enumerate(chunks):
        ids, labels = c["input_ids"], batch["labels"][i].tolist()
        chosen = [lab != -100 for lab in labels]
        assert all(labels[j] == ids[j] for j in range(len(ids)) if chosen[j])  # labels only where chosen
        assert not any(chosen[len(ids):]) and not any(chosen[j] for j, t in enumerate(ids) if t in special)
        for p in c["chinese_ref"]:  # a continuation is chosen exactly when the token before it is
            if p > 1:
                assert chosen[p] == chosen[p - 1]


# ------------------------------------------------------------------ MiniRBT / TextBrewer raw checkpoints
def test_minirbt_pkl_checkpoints_convert_safely(tmp_path):
    from conftest import run_script
    from transformers import BertModel

    model = tiny_bert(layers=1, hidden=32, heads=2, ffn=64, seed=5)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(model.config.to_dict()))
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_bytes(default_vocab_path().read_bytes())
    # as TextBrewer under DDP saves it: gs{step}.pkl, a raw state dict with "module." keys
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "gs100.pkl")
    run_script("scripts/convert_checkpoint.py", "--checkpoint", tmp_path / "gs100.pkl", "--config", cfg,
               "--vocab", vocab, "--output", tmp_path / "out")
    loaded = BertModel.from_pretrained(str(tmp_path / "out"))
    for k, v in model.bert.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # bare BertModel keys: accepted, the absent MLM head is reported
    torch.save(model.bert.state_dict(), tmp_path / "bare.bin")
    proc = run_script("scripts/convert_checkpoint.py", "--checkpoint", tmp_path / "bare.bin", "--config", cfg,
                      "--vocab", vocab, "--output", tmp_path / "bare")
    assert "no MLM head in the file" in proc.stdout
    # a pickle that would run code is refused, and nothing runs
    marker = tmp_path / "pwned"
    torch.save({"bert.embeddings.word_embeddings.weight": _Exploit(marker)}, tmp_path / "evil.pkl")
    proc = run_script("scripts/convert_checkpoint.py", "--checkpoint", tmp_path / "evil.pkl", "--config", cfg,
                      "--vocab", vocab, "--output", tmp_path / "evil", check=False)
    assert proc.returncode == 2 and "not a plain tensor state dict" in proc.stderr
    assert "would call io.open" in proc.stderr
    assert "weights_only=False" not in proc.stderr  # never advise running the file's code
    assert not marker.exists() and not (tmp_path / "evil").exists()
    wrong = tiny_bert(layers=1, hidden=48, heads=2, ffn=64)
    torch.save(wrong.state_dict(), tmp_path / "wrong.pkl")
    proc = run_script("scripts/convert_checkpoint.py", "--checkpoint", tmp_path / "wrong.pkl", "--config", cfg,
                      "--vocab", vocab, "--output", tmp_path / "wrong", check=False)
    assert proc.returncode == 2 and "shapes differ from the config" in proc.stderr


def test_neural_ltp_folder_cannot_name_arbitrary_code(tmp_path):
    from test_segmentation import tiny_neural_ltp

    from minirbt.segmentation import make_segmenter

    folder = tiny_neural_ltp(tmp_path / "ltp")
    config = json.loads((folder / "config.json").read_text())
    marker = tmp_path / "pwned"
    config["model"]["processor"]["cws"] = {"_ltp_target_": "pathlib.Path.touch", "self": str(marker)}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorpusError, match="_ltp_target_ 'pathlib.Path.touch' is not one of LTP's classes"):
        make_segmenter("ltp", folder)
    assert not marker.exists()


# ------------------------------------------------------------------ stage outputs: all or nothing
def _kill_when(script: str, args: list[str], ready, extra_delay: float = 0.0) -> None:
    """Start one of the project's scripts, SIGKILL it once ``ready()`` holds (it is mid-way), and check it really
    was mid-way."""
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.01)
    time.sleep(extra_delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert alive, f"{script} ended (exit {proc.returncode}) before it could be killed mid-way:\n{err.decode()[-3000:]}"


def test_killed_stages_leave_nothing_a_later_stage_accepts(tmp_path, vocab_dir):
    """SIGKILL run_chinese_ref.py while it writes, and my_datasets.py while it builds: no output a later stage
    takes for complete; the re-run then produces exactly what an uninterrupted run does."""
    from minirbt.corpus import peoples_daily_sentences
    from minirbt.data import load_pretraining_dataset

    text = peoples_daily_sentences()
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"{text[i % len(text)]}{i}\n" for i in range(60_000)), encoding="utf-8")
    refs, data = "pretraining/run_chinese_ref.py", "pretraining/my_datasets.py"
    refs_args = ["--input", str(corpus), "--tokenizer", str(vocab_dir), "--segmenter", "jieba", "--num_workers", "2"]
    cache = tmp_path / "hf_cache"  # this test's own datasets cache: a killed build leaves its debris here

    def data_args(ref, out):
        return ["--train_file", str(corpus), "--train_ref_file", str(ref), "--tokenizer", str(vocab_dir),
                "--max_seq_length", "128", "--output_dir", str(out), "--num_workers", "2", "--cache_dir", str(cache)]

    straight_ref = tmp_path / "straight_ref.txt"
    run_script(refs, *refs_args, "--output", straight_ref)
    ref = tmp_path / "c_ref.txt"

    def refs_half_written() -> bool:  # the temporary output holds some refs, not all
        return any(p.stat().st_size > 10_000 for p in tmp_path.glob(".c_ref.txt.tmp-*"))

    _kill_when(refs, refs_args + ["--output", str(ref)], refs_half_written)
    assert not ref.exists() and list(tmp_path.glob(".c_ref.txt.tmp-*"))
    run_script(refs, *refs_args, "--output", ref)
    assert ref.read_bytes() == straight_ref.read_bytes()

    run_script(data, *data_args(ref, tmp_path / "straight_ds"))
    out = tmp_path / "ds"
    shutil.rmtree(cache)  # the killed build starts from nothing, as a first run does

    def building() -> bool:  # datasets has started writing Arrow files for this build
        return cache.is_dir() and any(cache.rglob("*.arrow"))

    _kill_when(data, data_args(ref, out), building, extra_delay=random.Random(2).uniform(0.0, 1.0))
    assert not out.exists()
    with pytest.raises(CorpusError, match="is not a dataset made by"):
        load_pretraining_dataset(out)
    run_script(data, *data_args(ref, out))
    a, b = load_pretraining_dataset(tmp_path / "straight_ds")["train"], load_pretraining_dataset(out)["train"]
    assert len(a) == len(b) > 100
    assert a["input_ids"] == b["input_ids"] and a["chinese_ref"] == b["chinese_ref"]


def test_gpu_smoke_script_passes_on_cpu(tmp_path):
    """The script a user runs first on GPUs runs its three checks here too (CPU, gloo) and they pass."""
    proc = subprocess.run(["sh", str(ROOT / "scripts/gpu_smoke.sh"), "--device", "cpu", "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    passed = [line for line in proc.stdout.splitlines() if line.startswith("PASS")]
    assert len(passed) == 3 and "3/3 checks passed" in proc.stdout, proc.stdout
    assert all("max |weight difference| 0 " in line for line in passed[::2])  # exact on CPU: resume, fine-tuning


def test_a_worker_is_silent_only_about_a_batch_handoff_the_training_process_broke_off():
    """Ctrl-C while the training process unpickles a batch breaks the hand-off of its shared memory; the worker's
    resource-sharer thread would print that traceback after the trainer's "interrupted: ..." line."""
    from minirbt.step_batches import _quiet_broken_handoff

    reported = []
    hook = _quiet_broken_handoff(lambda kind, value, tb: reported.append(kind))
    namespace: dict = {}
    exec(compile("def serve():\n    raise BrokenPipeError(32, 'Broken pipe')\n",
                 os.path.join("lib", "multiprocessing", "resource_sharer.py"), "exec"), namespace)

    def elsewhere():
        raise BrokenPipeError(32, "Broken pipe")

    for fn in (namespace["serve"], elsewhere, lambda: 1 / 0):
        try:
            fn()
        except BaseException:
            hook(*sys.exc_info())
    assert reported == [BrokenPipeError, ZeroDivisionError]
