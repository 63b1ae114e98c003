"""Several students from one teacher pass (``train.py --students``): each ends as its own single-student run."""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext

import pytest
import torch
from conftest import pretraining_dataset, run_script, tiny_bert
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM

import minirbt.mlm_eval
from minirbt.data import load_pretraining_dataset
from minirbt.mlm_eval import evaluate, evaluate_students
from minirbt.modeling import load_mlm
from minirbt.pretrain_setup import read_students
from minirbt.textio import CorpusError
from minirbt.tokenization import load_tokenizer
from minirbt.trainer import DistillArguments, train, train_students

# Student A (32 wide) reads the teacher's hidden states and attention maps (the teacher then runs with eager
# attention for both); student B (48 wide, 3 heads) reads MiniLMv2 relations of the teacher's last layer.
A_MATCHES = [{"layer_T": 4, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
              "proj": ["linear", 32, 64]},
             {"layer_T": 4, "layer_S": 2, "feature": "attention", "loss": "attention_mse_sum", "weight": 10}]
B_MATCHES = [{"layer_T": 4, "layer_S": 2, "feature": "relation", "loss": "relation_kl", "relation": r, "heads": 4,
              "weight": 1} for r in ("query", "key", "value")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, vocab_dir, real_lines):
    root = tmp_path_factory.mktemp("multi")
    lines = [x for x in real_lines if x.strip()]
    ds = pretraining_dataset(lines[:600], vocab_dir, root / "data", dev_lines=lines[600:720])
    configs = {}
    for name, hidden, heads in (("A", 32, 2), ("B", 48, 3)):
        configs[name] = root / f"{name}.json"
        configs[name].write_text(json.dumps(tiny_bert(layers=2, hidden=hidden, heads=heads, ffn=2 * hidden).config
                                            .to_dict()))
    return ds, configs


def students_for(tiny_teacher, setup, out, **kw) -> list[DistillArguments]:
    ds, configs = setup
    shared = dict(teacher=str(tiny_teacher), dataset=str(ds), temperature=1.0, max_steps=8, batch_size=8,
                  save_steps=4, eval_steps=0, logging_steps=1, seed=3, min_teacher_accuracy=0, dataloader_workers=0,
                  mlm_weight=1.0) | kw
    return [DistillArguments(output_dir=str(out / "A"), student_config=str(configs["A"]),
                             matches=[json.dumps(A_MATCHES)], learning_rate=1e-3, **shared),
            DistillArguments(output_dir=str(out / "B"), student_config=str(configs["B"]),
                             matches=[json.dumps(B_MATCHES)], learning_rate=2e-3, kd_weight=0.5, **shared)]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    # Alone, B's teacher runs SDPA; beside A (attention maps), eager attention: the same function, rounded
    # otherwise. After 8 Adam steps that moves B's weights by up to ~2e-6 (AMD EPYC; 0 for A, whose teacher runs
    # eager both ways), against ~1e-3 (Adam: about lr per step) for a step at another lr or on another batch.
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def singles(tiny_teacher, setup, tmp_path_factory):
    """Each student trained alone: what the one-pass runs must reproduce."""
    out = tmp_path_factory.mktemp("singles")
    for args in students_for(tiny_teacher, setup, out):
        train(args)
    return {name: weights(out / name) for name in ("A", "B")}


def test_one_teacher_pass_trains_each_student_as_its_single_run(tiny_teacher, setup, singles, tmp_path):
    summaries = train_students(students_for(tiny_teacher, setup, tmp_path))
    for name, summary in zip(("A", "B"), summaries):
        assert summary["steps"] == 8 and len(summary["history"]) == 8
        assert summary["trained_with"] == [str(tmp_path / ("B" if name == "A" else "A"))]
        assert_same(weights(tmp_path / name), singles[name])
    again = train_students(students_for(tiny_teacher, setup, tmp_path))  # finished: both skipped
    assert all(s.get("skipped") for s in again)


def test_a_student_behind_the_other_catches_up_alone_and_ends_the_same(tiny_teacher, setup, singles, tmp_path,
                                                                      monkeypatch):
    # Step 4's checkpoints: A's is written, B's hits a full disk: the run stops with A at step 4, B at step 0.
    monkeypatch.setenv("MINIRBT_FAULT", "checkpoint.model:2:enospc")
    with pytest.raises(CorpusError, match="could not write the checkpoint of step 4"):
        train_students(students_for(tiny_teacher, setup, tmp_path))
    monkeypatch.delenv("MINIRBT_FAULT")
    assert [p.name for p in (tmp_path / "A").glob("checkpoint-*")] == ["checkpoint-0000004"]
    assert not list((tmp_path / "B").glob("checkpoint-*"))
    summaries = train_students(students_for(tiny_teacher, setup, tmp_path, resume=True))
    assert [s["steps"] for s in summaries] == [8, 8]
    assert [h["step"] for h in summaries[0]["history"]] == list(range(1, 9))  # A's curve restored, not redone
    for name in ("A", "B"):
        assert_same(weights(tmp_path / name), singles[name])


def test_students_evaluated_together_score_as_alone_for_one_teacher_pass(tiny_teacher, setup, vocab_dir, tmp_path):
    ds, configs = setup
    dev = load_pretraining_dataset(ds)["validation"]
    teacher = load_mlm(tiny_teacher).eval()
    calls = []
    teacher.bert.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(0)
    models = [BertForMaskedLM(BertConfig.from_json_file(configs[name])).train() for name in ("A", "B")]
    a, b = students_for(tiny_teacher, setup, tmp_path, eval_batches=3)
    b = dataclasses.replace(b, temperature=4.0, kd_loss="mse")  # its own KD loss: B's scores use it
    tokenizer = load_tokenizer(vocab_dir)
    alone = [evaluate(m, teacher, dev, 7, tokenizer, args, torch.device("cpu"), nullcontext())
             for m, args in zip(models, (a, b))]
    n_batches = len(calls) // 2
    assert n_batches == min(3, -(-len(dev) // 8)) and n_batches >= 2  # the dev split is long enough to test it
    calls.clear()
    together = evaluate_students(list(zip(models, (a, b))), teacher, dev, 7, tokenizer, torch.device("cpu"),
                                 nullcontext())
    assert len(calls) == n_batches  # once per dev batch, not once per student
    assert alone[0]["kd_loss"] != alone[1]["kd_loss"]
    for one, both in zip(alone, together):
        assert both.keys() == one.keys()
        for key in one:
            assert both[key] == pytest.approx(one[key], rel=1e-6), key
    assert all(m.training for m in models)  # each model back in its mode
    with pytest.raises(ValueError, match="share batch_size"):
        evaluate_students([(models[0], a), (models[1], dataclasses.replace(b, batch_size=4))], teacher, dev, 7,
                          tokenizer, torch.device("cpu"), nullcontext())


def test_students_due_for_evaluation_share_the_teacher_pass_over_dev(tiny_teacher, setup, tmp_path, monkeypatch):
    calls = []
    teacher_forward = minirbt.mlm_eval.teacher_forward
    monkeypatch.setattr(minirbt.mlm_eval, "teacher_forward",
                        lambda *a, **k: calls.append(1) or teacher_forward(*a, **k))
    summaries = train_students(students_for(tiny_teacher, setup, tmp_path, eval_steps=4, eval_batches=2))
    for summary in summaries:
        assert [h["step"] for h in summary["dev_history"]] == [0, 4, 8]
        assert summary["dev"]["tokens"] == summary["dev_start"]["tokens"] > 0
    assert summaries[0]["dev"]["student_mlm_loss"] != summaries[1]["dev"]["student_mlm_loss"]
    # the teacher check (A's step-0 scores), B's step-0 scores, then one pass per evaluation for both students
    n_batches = min(2, -(-len(load_pretraining_dataset(setup[0])["validation"]) // 8))
    assert len(calls) == 4 * n_batches


def test_students_of_one_pass_must_share_the_teacher_data_and_steps(tiny_teacher, setup, tmp_path):
    a, b = students_for(tiny_teacher, setup, tmp_path)
    b.max_steps = 9
    with pytest.raises(CorpusError, match=r"share max_steps: .*A has 8, .*B has 9"):
        train_students([a, b])
    with pytest.raises(CorpusError, match="two students write to"):
        train_students([a, students_for(tiny_teacher, setup, tmp_path)[0]])
    assert not (tmp_path / "A").exists()  # refused before anything was written


def test_students_file_is_checked_entry_by_entry(tiny_teacher, setup, tmp_path):
    ds, configs = setup
    base = DistillArguments(teacher=str(tiny_teacher), dataset=str(ds), students=str(tmp_path / "s.json"))
    for entries, message in (([], "non-empty JSON list"),
                             ([{"student_config": str(configs["A"])}], "student 1: no output_dir"),
                             ([{"output_dir": "x"}, {"output_dir": "y", "lerning_rate": 1}],
                              r"student 2: unknown settings \['lerning_rate'\]"),
                             ([{"output_dir": "x", "max_steps": 3}], "shared settings .'max_steps'. belong on the "
                                                                     "command line"),
                             ([{"output_dir": "x", "learning_rate": -1}], "student 1: .*learning_rate")):
        (tmp_path / "s.json").write_text(json.dumps(entries))
        with pytest.raises(CorpusError, match=message):
            read_students(base)
    (tmp_path / "s.json").write_text(json.dumps([{"output_dir": "x", "student_config": str(configs["B"]),
                                                  "learning_rate": 5e-4}]))
    (student,) = read_students(base)
    assert (student.output_dir, student.learning_rate, student.teacher) == ("x", 5e-4, str(tiny_teacher))


def test_train_py_students_flag_trains_every_listed_student(tiny_teacher, setup, singles, tmp_path):
    ds, configs = setup
    a, b = students_for(tiny_teacher, setup, tmp_path)
    entries = [{"output_dir": s.output_dir, "student_config": s.student_config, "matches": s.matches,
                "learning_rate": s.learning_rate, **({"kd_weight": 0.5} if s is b else {})} for s in (a, b)]
    (tmp_path / "students.json").write_text(json.dumps(entries))
    proc = run_script("pretraining/train.py", "--teacher", tiny_teacher, "--dataset", ds, "--students",
                      tmp_path / "students.json", "--temperature", "1", "--max_steps", "8", "--batch_size", "8",
                      "--save_steps", "4", "--eval_steps", "0", "--seed", "3", "--min_teacher_accuracy", "0",
                      "--mlm_weight", "1", "--dataloader_workers", "0")
    assert proc.stdout.count("student after 8 steps") == 2
    for name in ("A", "B"):
        assert_same(weights(tmp_path / name), singles[name])
    proc = run_script("pretraining/train.py", "--teacher", tiny_teacher, "--dataset", ds, "--students",
                      tmp_path / "students.json", "--output_dir", tmp_path / "C", check=False)
    assert proc.returncode != 0 and "each student in the --students file names its own output_dir" in proc.stderr
