"""Stage 3: shipped configs, teacher-assistant initialisation, model folders."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_script, tiny_bert
from transformers import BertModel, BertTokenizer

from minirbt.modeling import (
    CONFIG_NAMES,
    count_parameters,
    init_from_teacher,
    load_config,
    load_mlm,
    parse_layer_map,
    save_model_folder,
)
from minirbt.textio import CorpusError
from minirbt.tokenization import default_vocab_path

# MiniRBT's table (ANCHORS.md): millions of parameters, with and without embeddings
EXPECTED = {"roberta_wwm_ext": (102.3, 85.7), "rbt6": (59.76, 43.14), "rbt3": (38.5, 21.9),
            "rbt4_h312": (11.4, 4.7), "minirbt_h256": (10.4, 4.8), "minirbt_h288": (12.3, 6.1)}


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_shipped_configs_have_the_published_sizes(name):
    total, no_emb = count_parameters(load_config(name))
    want_total, want_no_emb = EXPECTED[name]
    assert abs(total / 1e6 - want_total) < 0.06
    assert abs(no_emb / 1e6 - want_no_emb) < 0.06


def test_layer_maps():
    assert parse_layer_map("uniform", 12, 6) == [0, 2, 4, 7, 9, 11]  # MiniRBT's code
    assert parse_layer_map("first", 12, 6) == [0, 1, 2, 3, 4, 5]  # MiniRBT's README
    assert parse_layer_map("0,2,4,7,9,11", 12, 6) == [0, 2, 4, 7, 9, 11]
    assert parse_layer_map("uniform", 12, 4) == [0, 4, 7, 11]
    for spec, message in [("0,1,12,3,4,5", "out of range"), ("0,1", "lists 2 layers"), ("every", "must be")]:
        with pytest.raises(CorpusError, match=message):
            parse_layer_map(spec, 12, 6)


def test_first_map_reproduces_teacher_hidden_states(tiny_teacher, tokenizer, real_lines, tmp_path):
    out = tmp_path / "ta"
    run_script("scripts/init_checkpoint_TA.py", "--teacher", tiny_teacher, "--student_config",
               _config_file(tmp_path, layers=2), "--layer_map", "first", "--output", out)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"}
    teacher = BertModel.from_pretrained(str(tiny_teacher)).eval()
    ta = BertModel.from_pretrained(str(out)).eval()
    tok = BertTokenizer.from_pretrained(str(out))
    assert tok.convert_ids_to_tokens(tok("自然语言")["input_ids"]) == ["[CLS]", "自", "然", "语", "言", "[SEP]"]
    batch = tokenizer(real_lines[:16], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        h_t = teacher(**batch, output_hidden_states=True).hidden_states
        h_s = ta(**batch, output_hidden_states=True).hidden_states
    assert len(h_s) == 3
    for i in range(3):  # embeddings and the first two layers: numerically the teacher's
        torch.testing.assert_close(h_s[i], h_t[i], rtol=0, atol=1e-5)
    t_mlm, s_mlm = load_mlm(tiny_teacher), load_mlm(out)
    for name in ("transform.dense.weight", "transform.LayerNorm.weight", "bias"):
        torch.testing.assert_close(s_mlm.cls.predictions.get_parameter(name), t_mlm.cls.predictions.get_parameter(name))
    torch.testing.assert_close(s_mlm.cls.predictions.bias, t_mlm.cls.predictions.bias)
    assert s_mlm.cls.predictions.decoder.weight.data_ptr() == s_mlm.bert.embeddings.word_embeddings.weight.data_ptr()


def test_uniform_map_copies_the_chosen_layers(tmp_path):
    teacher = tiny_bert(layers=6, hidden=32, heads=2, ffn=64)
    config = load_config(_config_file(tmp_path, layers=3, hidden=32, heads=2, ffn=64))
    student, layers = init_from_teacher(teacher, config, "uniform")
    assert layers == [0, 2, 5]
    for s, t in enumerate(layers):
        for (ns, ps), (nt, pt) in zip(student.bert.encoder.layer[s].state_dict().items(),
                                      teacher.bert.encoder.layer[t].state_dict().items()):
            assert ns == nt and torch.equal(ps, pt)


def test_mlm_head_copied_or_left_random(tmp_path):
    teacher = tiny_bert(layers=4, hidden=32, heads=2, ffn=64, seed=1)
    config = load_config(_config_file(tmp_path, layers=2, hidden=32, heads=2, ffn=64))
    copied, _ = init_from_teacher(teacher, config, "first", mlm_head="copy")
    torch.manual_seed(5)
    fresh, _ = init_from_teacher(teacher, config, "first", mlm_head="random")
    t_head = teacher.cls.predictions.transform.dense.weight
    assert torch.equal(copied.cls.predictions.transform.dense.weight, t_head)
    assert not torch.equal(fresh.cls.predictions.transform.dense.weight, t_head)
    for m in (copied, fresh):  # the decoder is the (copied) embedding matrix either way
        assert torch.equal(m.cls.predictions.decoder.weight, teacher.bert.embeddings.word_embeddings.weight)
    with pytest.raises(CorpusError, match="--mlm_head must be one of copy, random"):
        init_from_teacher(teacher, config, "first", mlm_head="teacher")


def _config_file(tmp_path, layers=2, hidden=64, heads=4, ffn=128):
    cfg = json.loads(open(load_config.__globals__["config_path"]("rbt6")).read())
    cfg.update(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn)
    path = tmp_path / f"student_{layers}_{hidden}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_clear_errors(tiny_teacher, tmp_path):
    teacher = load_mlm(tiny_teacher)
    with pytest.raises(CorpusError, match="hidden_size is 64, the student config's is 32"):
        init_from_teacher(teacher, load_config(_config_file(tmp_path, hidden=32, heads=2)), "first")
    with pytest.raises(CorpusError, match=r"out of range 0\.\.3"):
        init_from_teacher(teacher, load_config(_config_file(tmp_path, layers=2)), "0,4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="lacks config.json, model.safetensors .*vocab.txt"):
        load_mlm(tmp_path / "empty")
    with pytest.raises(CorpusError, match="teacher not found"):
        load_mlm(tmp_path / "missing")
    with pytest.raises(CorpusError, match="student config not found"):
        load_config("rbt7")
    proc = run_script("scripts/init_checkpoint_TA.py", "--teacher", tmp_path / "missing", "--output",
                      tmp_path / "out", check=False)
    assert proc.returncode == 2 and "teacher not found" in proc.stderr and "Traceback" not in proc.stderr


def test_saved_folder_round_trips(tmp_path):
    model = tiny_bert(layers=1, hidden=32, heads=2, ffn=64)
    save_model_folder(model, default_vocab_path(), tmp_path / "m")
    again = load_mlm(tmp_path / "m")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
