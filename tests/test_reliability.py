"""First reliability promises: untrusted weight files, non-finite losses."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import ROOT, tiny_bert
from safetensors.torch import load_file, save_file

from minirbt.modeling import load_mlm, save_model_folder
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
    from minirbt.data import build_pretraining_dataset
    from minirbt.refs import RefBuilder, write_ref_file
    from minirbt.segmentation import make_segmenter
    from minirbt.tokenization import LineTokenizer, load_tokenizer
    from minirbt.trainer import DistillArguments, train

    bad = tmp_path / "nan_teacher"
    save_model_folder(load_mlm(tiny_teacher), default_vocab_path(), bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["cls.predictions.bias"][:] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "c.txt").write_text("\n".join(real_lines[:200]) + "\n", encoding="utf-8")
    builder = RefBuilder(LineTokenizer(load_tokenizer(vocab_dir)), make_segmenter("jieba"))
    write_ref_file(builder, tmp_path / "c.txt", tmp_path / "c_ref.txt", progress=False)
    build_pretraining_dataset([tmp_path / "c.txt"], [tmp_path / "c_ref.txt"], vocab_dir, tmp_path / "ds",
                              max_seq_length=64)
    cfg = tmp_path / "s.json"
    cfg.write_text(json.dumps(tiny_bert(layers=1, hidden=32, heads=2, ffn=64).config.to_dict()))
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=r"non-finite loss at step 1: term kd"):
        train(DistillArguments(teacher=str(bad), dataset=str(tmp_path / "ds"), output_dir=str(out),
                               student_config=str(cfg), max_steps=4, batch_size=4, save_steps=2, eval_steps=0))
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()
