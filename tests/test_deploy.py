"""Deployment: ONNX export of every head, parity with PyTorch, int8 on a dev set, vocabulary pruning."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertTokenizer,
)

from minirbt.export import INT8_NAME, ONNX_NAME, export_folder
from minirbt.textio import CorpusError
from minirbt.vocab_prune import count_corpus, kept_ids, prune_folder

CLASSES = {"mlm": BertForMaskedLM, "classification": BertForSequenceClassification, "mrc": BertForQuestionAnswering,
           "ner": BertForTokenClassification, "encoder": BertModel}
OUTPUTS = {"mlm": ["logits"], "classification": ["logits"], "mrc": ["start_logits", "end_logits"], "ner": ["logits"],
           "encoder": ["last_hidden_state"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory, shared_data) -> dict[str, Path]:
    """A tiny MLM folder, a QA folder from it, and a classifier fine-tuned from it (run_classification, so its
    best/ folder sits in a run with results.json); dev files of both tasks from the real data."""
    from conftest import tiny_bert

    from minirbt.classification import ClassificationArguments, run_classification
    from minirbt.modeling import save_model_folder, write_model_files
    from minirbt.tokenization import default_vocab_path

    root = tmp_path_factory.mktemp("deploy")
    save_model_folder(tiny_bert(layers=2, std=0.2), default_vocab_path(), root / "mlm")
    torch.manual_seed(1)
    qa = BertForQuestionAnswering.from_pretrained(str(root / "mlm"))
    (root / "qa").mkdir()
    write_model_files(qa, root / "mlm" / "vocab.txt", root / "qa")
    tagger = BertForTokenClassification.from_pretrained(str(root / "mlm"), num_labels=7)  # run_ner.py's head
    (root / "ner").mkdir()
    write_model_files(tagger, root / "mlm" / "vocab.txt", root / "ner")
    with open(shared_data / "chnsenticorp" / "ChnSentiCorp_htl_all.csv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["review"].strip()]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))[:900]]
    for name, part in (("train", rows[:600]), ("dev", rows[600:])):
        (root / f"{name}.tsv").write_text("label\ttext_a\n" + "".join(
            f"{r['label']}\t{' '.join(r['review'].split())}\n" for r in part), encoding="utf-8")
    run_classification(ClassificationArguments(
        task="chnsenticorp", model=str(root / "mlm"), train_file=str(root / "train.tsv"),
        dev_file=str(root / "dev.tsv"), output_dir=str(root / "ft"), epochs=1, max_seq_length=32, seeds="1",
        learning_rate=5e-4))
    doc = json.loads((shared_data / "cmrc2018" / "trial.json").read_text(encoding="utf-8"))
    doc["data"] = doc["data"][:6]
    (root / "mrc_dev.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return {"mlm": root / "mlm", "encoder": root / "mlm", "mrc": root / "qa", "ner": root / "ner",
            "classification": root / "ft" / "best", "root": root}


def ort_outputs(path: Path, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The ONNX file run with plain onnxruntime (what a user's serving code does)."""
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = s.run(None, {i.name: batch[i.name].numpy() for i in s.get_inputs()})
    return dict(zip([o.name for o in s.get_outputs()], out))


def encode(tokenizer, texts: list[str], pairs: bool = False) -> dict[str, torch.Tensor]:
    if pairs:
        return dict(tokenizer(texts[::2], texts[1::2], padding=True, truncation=True, max_length=96,
                              return_tensors="pt"))
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=96, return_tensors="pt"))


@pytest.mark.parametrize("task", ["mlm", "classification", "mrc", "ner", "encoder"])
def test_export_matches_pytorch_at_any_batch_and_length(task, models, real_lines):
    out = models["root"] / f"onnx_{task}"
    int8 = task in ("classification", "mrc", "ner")
    dev = {"dev_file": str(models["root"] / "mrc_dev.json"), "dev_task": "cmrc2018", "max_seq_length": 256} \
        if task == "mrc" else {}
    report = export_folder(str(models[task]), str(out), task="encoder" if task == "encoder" else "auto",
                           int8=int8, **dev)
    assert report["task"] == task
    assert max(report["parity_max_abs_diff"].values()) <= 1e-4
    for name in (ONNX_NAME, "config.json", "vocab.txt", "tokenizer_config.json", "export_report.json"):
        assert (out / name).is_file(), name
    assert (out / INT8_NAME).is_file() == int8
    tokenizer = BertTokenizer.from_pretrained(str(out))  # the folder is self-contained
    cls = CLASSES[task]
    torch_model = (cls.from_pretrained(str(models[task]), add_pooling_layer=False) if cls is BertModel
                   else cls.from_pretrained(str(models[task]))).eval()
    session = ort.InferenceSession(str(out / ONNX_NAME), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in session.get_outputs()] == OUTPUTS[task]
    # shapes never seen at export: one short text; three padded pairs (token_type_ids 1 on the second text)
    for batch in (encode(tokenizer, [real_lines[3][:5]]), encode(tokenizer, real_lines[10:16], pairs=True)):
        with torch.no_grad():
            ref = torch_model(**batch)
        got = ort_outputs(out / ONNX_NAME, batch)
        keep = batch["attention_mask"].bool().numpy()
        for name in OUTPUTS[task]:
            r = getattr(ref, name).numpy()
            assert got[name].shape == r.shape
            diff = np.abs(got[name] - r)
            assert (diff if task == "classification" else diff[keep]).max() <= 1e-4, name
        if int8:  # int8 runs on the same inputs and stays close to fp32
            q = ort_outputs(out / INT8_NAME, batch)
            assert all(np.isfinite(q[n]).all() and q[n].shape == got[n].shape for n in OUTPUTS[task])
    if int8:
        assert (out / INT8_NAME).stat().st_size < 0.5 * (out / ONNX_NAME).stat().st_size
    if task == "mrc":
        scores = report["dev"]["scores"]
        assert set(scores) == {"torch_fp32", "onnx_fp32", "onnx_int8"}
        assert report["dev"]["examples"] > 20 and set(scores["onnx_int8"]) == {"em", "f1"}
        assert abs(scores["onnx_fp32"]["f1"] - scores["torch_fp32"]["f1"]) < 1.0
    # the same request again is recognised as done; the output never replaces the model folder
    assert export_folder(str(models[task]), str(out), task="encoder" if task == "encoder" else "auto",
                         int8=int8, **dev) == report
    with pytest.raises(CorpusError, match="is the --model input"):
        export_folder(str(models[task]), str(models[task]))


def test_int8_scored_on_the_dev_set_of_its_fine_tuning_run(models):
    """The best/ folder of a run brings its task and length; PyTorch fp32 reproduces the run's dev accuracy; the
    int8 accuracy is what plain onnxruntime gives on the same encoded rows."""
    from minirbt.classification import encode as encode_rows
    from minirbt.finetune import pad
    from minirbt.tasks import read_classification

    out = models["root"] / "onnx_cls_dev"
    report = export_folder(str(models["classification"]), str(out), int8=True,
                           dev_file=str(models["root"] / "dev.tsv"))
    run = json.loads((models["root"] / "ft" / "results.json").read_text())
    dev = report["dev"]
    assert dev["task"] == "chnsenticorp" and dev["max_seq_length"] == 32 and dev["examples"] == 300
    assert dev["scores"]["torch_fp32"]["accuracy"] == pytest.approx(run["per_seed"][0]["accuracy"], abs=1e-12)
    assert abs(dev["scores"]["onnx_fp32"]["accuracy"] - dev["scores"]["torch_fp32"]["accuracy"]) <= 1 / 300
    examples, _ = read_classification("chnsenticorp", models["root"] / "dev.tsv")
    tokenizer = BertTokenizer.from_pretrained(str(out))
    rows = encode_rows(tokenizer, examples, 32)
    batch = pad(rows, tokenizer.pad_token_id)
    logits = ort_outputs(out / INT8_NAME, {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    accuracy = float((logits["logits"].argmax(-1) == np.array([e.label for e in examples])).mean())
    assert dev["scores"]["onnx_int8"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert dev["change"]["accuracy"] == pytest.approx(accuracy - dev["scores"]["torch_fp32"]["accuracy"])


def test_export_that_does_not_reproduce_the_model_writes_nothing(models):
    out = models["root"] / "onnx_strict"
    with pytest.raises(CorpusError, match="does not reproduce"):
        export_folder(str(models["mlm"]), str(out), atol=1e-12)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_pruned_model_is_the_same_model_on_kept_tokens(models, real_lines):
    corpus = models["root"] / "corpus.txt"
    corpus.write_text("\n".join(real_lines[:400]) + "\n", encoding="utf-8")
    out = models["root"] / "mlm_pruned"
    report = prune_folder(str(models["mlm"]), str(corpus), str(out))
    full_tok = BertTokenizer.from_pretrained(str(models["mlm"]))
    tok = BertTokenizer.from_pretrained(str(out))
    assert report["vocab_after"] == len(tok) < report["vocab_before"] == len(full_tok)
    assert report["params_after"] < report["params_before"] and report["bytes_after"] < report["bytes_before"]
    keep = full_tok.convert_tokens_to_ids([tok.convert_ids_to_tokens(i) for i in range(len(tok))])
    assert keep == sorted(keep) and set(full_tok.all_special_ids) <= set(keep)
    full = BertForMaskedLM.from_pretrained(str(models["mlm"])).eval()
    pruned = BertForMaskedLM.from_pretrained(str(out)).eval()
    assert pruned.config.vocab_size == len(tok)
    assert pruned.cls.predictions.decoder.weight.data_ptr() == pruned.bert.embeddings.word_embeddings.weight.data_ptr()
    texts = real_lines[5:13]  # corpus lines: every token kept
    assert [tok.tokenize(t) for t in texts] == [full_tok.tokenize(t) for t in texts]
    a, b = encode(full_tok, texts), encode(tok, texts)
    with torch.no_grad():
        ref, got = full(**a).logits[..., keep], pruned(**b).logits
    assert torch.allclose(ref, got, atol=1e-5)
    # a character the corpus never had becomes [UNK]; every other token is unchanged
    text = real_lines[5][:12]
    seen = set(corpus.read_text(encoding="utf-8"))
    absent = next(t for t in full_tok.vocab if len(t) == 1 and "\u4e00" <= t <= "\u9fff" and t not in seen)
    mixed = text[:6] + absent + text[6:]
    assert tok.tokenize(mixed) == full_tok.tokenize(text[:6]) + ["[UNK]"] + full_tok.tokenize(text[6:])


def test_fine_tuned_folder_pruned_then_exported(models, real_lines):
    """A classifier pruned to its domain keeps its predictions on that domain and exports with int8."""
    dev = models["root"] / "dev.tsv"
    out = models["root"] / "cls_pruned"
    prune_folder(str(models["classification"]), str(dev), str(out))
    full = BertForSequenceClassification.from_pretrained(str(models["classification"])).eval()
    pruned = BertForSequenceClassification.from_pretrained(str(out)).eval()
    texts = [line.split("\t", 1)[1] for line in dev.read_text(encoding="utf-8").splitlines()[1:9]]
    with torch.no_grad():
        a = full(**encode(BertTokenizer.from_pretrained(str(models["classification"])), texts)).logits
        b = pruned(**encode(BertTokenizer.from_pretrained(str(out)), texts)).logits
    assert torch.allclose(a, b, atol=1e-5)
    report = export_folder(str(out), str(models["root"] / "cls_pruned_onnx"), int8=True)
    assert report["task"] == "classification" and max(report["parity_max_abs_diff"].values()) <= 1e-4


def test_dataset_corpus_keeps_what_its_text_keeps(models, real_lines, tmp_path):
    """A my_datasets.py folder counts the same tokens as the text it was built from."""
    from minirbt.data import build_pretraining_dataset
    from minirbt.refs import RefBuilder, write_ref_file
    from minirbt.segmentation import make_segmenter
    from minirbt.tokenization import LineTokenizer

    text = tmp_path / "a.txt"
    text.write_text("\n".join(real_lines[:200]) + "\n", encoding="utf-8")
    tok = BertTokenizer.from_pretrained(str(models["mlm"]))
    write_ref_file(RefBuilder(LineTokenizer(tok), make_segmenter("jieba")), text, tmp_path / "a_ref.txt",
                   progress=False)
    build_pretraining_dataset([text], [tmp_path / "a_ref.txt"], models["mlm"], tmp_path / "ds", max_seq_length=64)
    from_text, read_text = count_corpus(text, tok)
    from_ds, read_ds = count_corpus(tmp_path / "ds", tok)
    assert read_text["lines"] == 200 and read_ds["kind"] == "dataset" and read_ds["sequences"] > 0
    assert kept_ids(from_text, tok) == kept_ids(from_ds, tok)
