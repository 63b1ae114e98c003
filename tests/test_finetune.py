"""Stage 5: CLUE readers on the real files, the CMRC 2018 metric, fine-tuning and task distillation."""

from __future__ import annotations

import csv
import json
import random

import pytest
from conftest import run_script, tiny_bert
from transformers import BertForSequenceClassification

from minirbt.modeling import save_model_folder
from minirbt.tasks import cmrc_em, cmrc_f1, cmrc_score, read_classification, read_squad
from minirbt.textio import CorpusError
from minirbt.tokenization import default_vocab_path


def test_readers_count_the_real_files(shared_data):
    ex, rep = read_classification("ocnli", shared_data / "ocnli" / "train.10k.json")
    labels = [json.loads(line)["label"] for line in open(shared_data / "ocnli" / "train.10k.json", encoding="utf-8")]
    assert rep.records == 10_000 and rep.unusable == {"no gold label": labels.count("-")} and labels.count("-") > 0
    assert len(ex) == rep.usable == 10_000 - labels.count("-")
    assert {e.label for e in ex} == {0, 1, 2} and ex[0].text_b
    ex, rep = read_classification("ocnli", shared_data / "ocnli" / "dev.json")
    assert len(ex) + rep.unusable["no gold label"] == rep.records == 3_000
    ex_all, rep_all = read_classification("ocnli", shared_data / "ocnli" / "dev.json", keep_unlabelled=True)
    assert len(ex_all) == 3_000 and sum(e.label is None for e in ex_all) == rep.unusable["no gold label"]
    with open(shared_data / "chnsenticorp" / "ChnSentiCorp_htl_all.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    ex, rep = read_classification("chnsenticorp", shared_data / "chnsenticorp" / "ChnSentiCorp_htl_all.csv")
    assert len(ex) + sum(rep.unusable.values()) == rep.records == len(rows) == 7_766
    assert rep.unusable == {"empty text": sum(1 for r in rows if not r["review"].strip())}
    assert sum(e.label for e in ex) == sum(r["label"] == "1" for r in rows if r["review"].strip())
    assert any("," in e.text_a for e in ex) and any('"' in e.text_a for e in ex)  # quoted fields kept whole
    for name, n in (("trial.json", 1_002), ("dev.json", 3_219)):
        ex, rep = read_squad(shared_data / "cmrc2018" / name)
        assert len(ex) == n and all(e.answers for e in ex)
        good, rep_train = read_squad(shared_data / "cmrc2018" / name, training=True)
        assert good == [e for e in ex if e.answer_start is not None]
        bad = rep_train.unusable["answer_start does not point at the answer"]
        assert len(good) + bad == rep_train.records == n and 0 < bad < 10
        assert all(e.context[e.answer_start :].startswith(e.answers[0]) for e in good)


def test_readers_of_the_other_formats(tmp_path):
    rows = ["text_a\ttext_b\tlabel", "喜欢打篮球的男生喜欢什么样的女生\t爱打篮球的男生喜欢什么样的女生\t1",
            "我手机丢了\t我想换个手机\t0"]
    (tmp_path / "lcqmc.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    ex, _ = read_classification("lcqmc", tmp_path / "lcqmc.tsv")
    assert [(e.text_b, e.label) for e in ex] == [("爱打篮球的男生喜欢什么样的女生", 1), ("我想换个手机", 0)]
    (tmp_path / "tnews.json").write_text(json.dumps({"label": "102", "label_desc": "news_entertainment",
                                                     "sentence": "江疏影甜甜圈自拍", "keywords": ""},
                                                    ensure_ascii=False) + "\n", encoding="utf-8")
    ex, _ = read_classification("tnews", tmp_path / "tnews.json")
    assert ex[0].label == 2 and ex[0].text_b is None
    (tmp_path / "afqmc.json").write_text('{"sentence1": "花呗怎么还款", "sentence2": "花呗如何还钱", "label": "1"}\n',
                                         encoding="utf-8")
    assert read_classification("afqmc", tmp_path / "afqmc.json")[0][0].label == 1
    (tmp_path / "senti.tsv").write_text("label\ttext_a\n1\t很好\n0\t很差\n", encoding="utf-8")
    assert [e.label for e in read_classification("chnsenticorp", tmp_path / "senti.tsv")[0]] == [1, 0]
    (tmp_path / "bad.tsv").write_text("a\tb\t7\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad.tsv:1: label '7' is not one of bq's labels"):
        read_classification("bq", tmp_path / "bad.tsv")
    with pytest.raises(CorpusError, match="unknown task"):
        read_classification("cola", tmp_path / "bad.tsv")


def test_cmrc_metric_on_hand_checked_cases():
    assert cmrc_em(["北京大学"], "北京大学") == 1 and cmrc_f1(["北京大学"], "北京大学") == 1
    assert cmrc_em(["北京大学"], "") == 0 and cmrc_f1(["北京大学"], "") == 0
    # 北京 vs 北京大学: common substring 2 chars; precision 2/2, recall 2/4 -> F1 2/3
    assert cmrc_f1(["北京大学"], "北京") == pytest.approx(2 / 3)
    # English and numbers are whole tokens: "iphone 12" is 2 segments
    assert cmrc_f1(["iPhone 12"], "iphone") == pytest.approx(2 / 3)
    assert cmrc_f1(["iPhone 12"], "iph") == 0
    # punctuation is removed before comparing; max over gold answers
    assert cmrc_em(["《红楼梦》"], "红楼梦") == 1
    assert cmrc_f1(["曹雪芹", "清代曹雪芹"], "曹雪芹") == 1
    # 1921年7月 vs 7月: segments [1921年7月] -> ["1921", 年, "7", 月]; pred ["7", 月] -> F1 2*(1*0.5)/1.5
    assert cmrc_f1(["1921年7月"], "7月") == pytest.approx(2 / 3)


def test_cmrc_score_of_gold_and_empty_answers(shared_data):
    ex, _ = read_squad(shared_data / "cmrc2018" / "dev.json")
    assert cmrc_score(ex, {e.qid: e.answers[0] for e in ex})["em"] == 100.0
    assert cmrc_score(ex, {e.qid: e.answers[0] for e in ex})["f1"] == 100.0
    empty = cmrc_score(ex, {e.qid: "" for e in ex})
    assert empty["em"] == 0 and empty["f1"] == 0
    half = cmrc_score(ex, {e.qid: e.answers[0] for e in ex[: len(ex) // 2]})
    assert half["em"] == pytest.approx(100 * (len(ex) // 2) / len(ex))


@pytest.fixture(scope="module")
def senti(tmp_path_factory, shared_data):
    """Shuffled ChnSentiCorp train/dev splits and a small 'pretrained' model folder."""
    d = tmp_path_factory.mktemp("senti")
    with open(shared_data / "chnsenticorp" / "ChnSentiCorp_htl_all.csv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["review"].strip()]
    random.Random(0).shuffle(rows)
    for name, part in (("train", rows[:2400]), ("dev", rows[2400:2900])):
        with open(d / f"{name}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "review"])
            w.writerows([r["label"], r["review"]] for r in part)
    save_model_folder(tiny_bert(layers=4, hidden=64, heads=4, ffn=128), default_vocab_path(), d / "model")
    save_model_folder(tiny_bert(layers=2, hidden=32, heads=2, ffn=64, seed=1), default_vocab_path(), d / "small")
    return d


@pytest.fixture(scope="module")
def finetuned(senti):
    out = senti / "ft"
    proc = run_script("finetuning/run_classification.py", "--task", "chnsenticorp", "--model", senti / "model",
                      "--train_file", senti / "train.csv", "--dev_file", senti / "dev.csv", "--test_file",
                      senti / "dev.csv", "--output_dir", out, "--epochs", "2", "--max_seq_length", "96",
                      "--learning_rate", "1e-3", "--seeds", "1,2")
    assert "accuracy" in proc.stdout
    return out


def test_finetuning_beats_the_majority_class(finetuned):
    r = json.loads((finetuned / "results.json").read_text())
    assert r["task"] == "chnsenticorp" and r["metric"] == "accuracy" and len(r["per_seed"]) == 2
    assert r["accuracy"] == pytest.approx(sum(s["accuracy"] for s in r["per_seed"]) / 2)
    assert r["best"] == max(s["accuracy"] for s in r["per_seed"])
    assert r["accuracy"] > r["majority_class_accuracy"] + 0.05, r
    preds = [json.loads(x) for x in (finetuned / "dev_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == r["dev_examples"] == 500
    assert sum(p["label"] == p["gold"] for p in preds) / len(preds) == pytest.approx(r["best"])
    assert len((finetuned / "test_predictions.jsonl").read_text().splitlines()) == 500
    model = BertForSequenceClassification.from_pretrained(str(finetuned / "best"))
    assert model.config.num_labels == 2


def test_task_distillation_moves_student_to_teacher(senti, finetuned):
    out = senti / "kd"
    run_script("finetuning/run_classification.py", "--task", "chnsenticorp", "--model", senti / "small",
               "--teacher", finetuned / "best", "--train_file", senti / "train.csv", "--dev_file", senti / "dev.csv",
               "--output_dir", out, "--epochs", "1", "--max_seq_length", "96", "--learning_rate", "1e-3",
               "--temperature", "2", "--hard_label_weight", "0.5", "--max_train_examples", "300",
               "--augment", "1", "--augment_mlm", senti / "model", "--augment_prob", "0.2")
    r = json.loads((out / "results.json").read_text())
    kl = r["per_seed"][0]["kl_to_teacher"]
    assert kl["after"] < kl["before"], kl
    assert r["train_examples"] == 600  # 300 originals + 1 augmented variant each


def test_mrc_on_real_cmrc(shared_data, senti, tmp_path):
    proc = run_script("finetuning/run_mrc.py", "--task", "cmrc2018", "--model", senti / "model", "--train_file",
                      shared_data / "cmrc2018" / "trial.json", "--dev_file", shared_data / "cmrc2018" / "dev.json",
                      "--max_train_examples", "150", "--max_eval_examples", "80", "--output_dir", tmp_path / "mrc",
                      "--epochs", "1", "--max_seq_length", "256", "--doc_stride", "64", "--seeds", "1")
    r = json.loads((tmp_path / "mrc" / "results.json").read_text())
    assert {"task", "em", "f1", "per_seed"} <= set(r) and r["dev_questions"] == 80
    assert r["train_features"] > 150  # long contexts became several windows
    assert r["skipped_bad_answers"] == 5 and "5 bad answers skipped" in proc.stdout
    preds = json.loads((tmp_path / "mrc" / "dev_predictions.json").read_text())
    ex, _ = read_squad(shared_data / "cmrc2018" / "dev.json")
    for e in ex[:80]:
        assert preds[e.qid] == "" or preds[e.qid] in e.context  # spans map back to the original characters
    assert cmrc_score(ex[:80], preds)["f1"] == pytest.approx(r["f1"])
    # distilling the fine-tuned reader into a smaller one, with an intermediate match
    match = '[{"layer_T": 4, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "proj": ["linear", 32, 64]}]'
    run_script("finetuning/run_mrc.py", "--task", "cmrc2018", "--model", senti / "small", "--teacher",
               tmp_path / "mrc" / "best", "--matches", match, "--train_file", shared_data / "cmrc2018" / "trial.json",
               "--dev_file", shared_data / "cmrc2018" / "dev.json", "--max_train_examples", "60",
               "--max_eval_examples", "30", "--output_dir", tmp_path / "mrc_kd", "--epochs", "1",
               "--max_seq_length", "256", "--doc_stride", "64", "--hard_label_weight", "0.5")
    kd = json.loads((tmp_path / "mrc_kd" / "results.json").read_text())
    assert kd["dev_questions"] == 30 and 0 <= kd["f1"] <= 100


def test_clear_errors(senti, finetuned, tmp_path):
    common = ["--train_file", senti / "train.csv", "--dev_file", senti / "dev.csv", "--output_dir", tmp_path / "o"]
    cases = [
        (["--task", "chnsenticorp", "--model", senti / "small", "--augment", "1"], "need --teacher"),
        (["--task", "cola", "--model", senti / "small"], "unknown classification task"),
        (["--task", "chnsenticorp", "--model", tmp_path / "none"], "model not found"),
    ]
    for args, message in cases:
        proc = run_script("finetuning/run_classification.py", *args, *common, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_mrc_test_file_and_resume_after_a_failed_checkpoint(shared_data, tmp_path, monkeypatch):
    """run_mrc.py has the common features: a labelled --test_file is scored per seed, an unlabelled one predicted;
    an interrupted run resumes at its last epoch checkpoint and ends as an uninterrupted one."""
    from minirbt.mrc import MRCArguments, run_mrc

    doc = json.loads((shared_data / "cmrc2018" / "trial.json").read_text(encoding="utf-8"))
    (tmp_path / "train.json").write_text(json.dumps({"data": doc["data"][:6]}, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "dev.json").write_text(json.dumps({"data": doc["data"][6:9]}, ensure_ascii=False), encoding="utf-8")
    unanswered = {"data": [{"paragraphs": [{"context": p["context"], "qas": [{"id": q["id"], "question": q["question"]}
                                                                           for q in p["qas"]]}
                                           for p in d["paragraphs"]]} for d in doc["data"][9:11]]}
    (tmp_path / "test.json").write_text(json.dumps(unanswered, ensure_ascii=False), encoding="utf-8")
    save_model_folder(tiny_bert(layers=1, hidden=32, heads=2, ffn=64, seed=2), default_vocab_path(), tmp_path / "m")

    def args(out, test, **kw):
        return MRCArguments(task="cmrc2018", model=str(tmp_path / "m"), train_file=str(tmp_path / "train.json"),
                            dev_file=str(tmp_path / "dev.json"), test_file=str(tmp_path / test),
                            output_dir=str(tmp_path / out), max_seq_length=128, doc_stride=32, learning_rate=1e-3,
                            **({"epochs": 2, "seeds": "1,2"} | kw))

    straight = run_mrc(args("straight", "dev.json"))
    assert straight["test_f1"] == pytest.approx(straight["f1"])  # the dev file as test: the same questions
    assert [r["test_em"] for r in straight["per_seed"]] == [r["em"] for r in straight["per_seed"]]
    assert set(json.loads((tmp_path / "straight" / "test_predictions.json").read_text())) == \
        set(json.loads((tmp_path / "straight" / "dev_predictions.json").read_text()))
    # a full disk at seed 1's second epoch checkpoint; then --resume
    monkeypatch.setenv("MINIRBT_FAULT", "finetune.checkpoint:2:enospc")
    with pytest.raises(OSError):
        run_mrc(args("killed", "dev.json"))
    monkeypatch.delenv("MINIRBT_FAULT")
    assert (tmp_path / "killed" / "checkpoints" / "seed-1-epoch-1").is_dir()
    resumed = run_mrc(args("killed", "dev.json", resume=True))
    assert [r["history"] for r in resumed["per_seed"]] == [r["history"] for r in straight["per_seed"]]
    assert resumed["f1"] == straight["f1"] and not (tmp_path / "killed" / "checkpoints").exists()
    # questions without answers: predicted, not scored
    unscored = run_mrc(args("unanswered", "test.json", seeds="1", epochs=1))
    preds = json.loads((tmp_path / "unanswered" / "test_predictions.json").read_text())
    assert "test_f1" not in unscored and len(preds) == sum(len(p["qas"]) for d in unanswered["data"]
                                                           for p in d["paragraphs"])


def test_fine_tuning_checkpoint_restores_the_cuda_generators(tmp_path, monkeypatch):
    """Dropout on a GPU draws from the CUDA generators: a resumed seed must continue them, not restart them.
    CUDA is simulated (two devices whose generator states live in a dict) so the round trip runs on CPU."""
    import torch

    from minirbt.checkpoints import SeedCheckpoints
    from minirbt.matches import build_projections
    from minirbt.optim import Optimization

    generators = {0: torch.arange(16, dtype=torch.uint8), 1: torch.arange(16, 32, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [generators[i].clone() for i in range(2)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: generators.__setitem__(device, state))

    model = tiny_bert(layers=1, hidden=32, heads=2, ffn=64)
    projections = build_projections([])
    opt = Optimization(model, projections, lr=1e-3, weight_decay=0.0, eps=1e-6, bias_correction=True,
                       warmup_steps=0, total_steps=4, max_grad_norm=1.0)
    best = {"score": 0.5, "epoch": 1, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    saved = {i: s.clone() for i, s in generators.items()}
    SeedCheckpoints(tmp_path, seed=1, resume=False).save_epoch(1, model, projections, opt, best, [])
    generators[0], generators[1] = torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)
    epoch, _, _ = SeedCheckpoints(tmp_path, seed=1, resume=True).restore(model, projections, opt)
    assert epoch == 1
    assert all(torch.equal(generators[i], saved[i]) for i in range(2))
