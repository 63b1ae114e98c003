"""MiniLMv2 relation distillation: the loss against its formula, the queries it reads, and runs between models of
different widths and head counts (pretraining and task distillation)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import pretraining_dataset, tiny_bert
from transformers import BertConfig, BertModel

from minirbt.matches import (
    check_matches,
    encoder_layers,
    match_losses,
    minilmv2_relations,
    relation_heads,
    relation_inputs,
    relation_kl_loss,
    resolve_matches,
    student_features,
)
from minirbt.textio import CorpusError


def direct_relation_kl(x_s, x_t, mask, heads):
    """The formula written out position by position: for each batch row, relation head and unpadded query i,
    KL(softmax_j(q_i . q_j / sqrt(d_T)) || softmax_j(s_i . s_j / sqrt(d_S))) over unpadded keys j; the mean."""
    def rel(x, b, r, i, valid):
        d = x.shape[-1] // heads
        part = x[b, :, r * d : (r + 1) * d]
        return torch.softmax(torch.tensor([float(part[i] @ part[j]) / math.sqrt(d) for j in valid]), 0)

    total, count = 0.0, 0
    for b in range(x_s.shape[0]):
        valid = [j for j in range(x_s.shape[1]) if mask[b, j]]
        for r in range(heads):
            for i in valid:
                p, q = rel(x_t, b, r, i, valid), rel(x_s, b, r, i, valid)
                total += float((p * (p.log() - q.log())).sum())
                count += 1
    return total / count


def test_relation_loss_is_minilmv2s_formula_for_different_widths():
    torch.manual_seed(0)
    x_s, x_t = torch.randn(2, 6, 8), torch.randn(2, 6, 12)  # student 8 wide, teacher 12: 2 heads of 4 / 6
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    got = relation_kl_loss(x_s, x_t, mask, heads=2)
    assert float(got) == pytest.approx(direct_relation_kl(x_s, x_t, mask, 2), rel=1e-5)
    assert float(relation_kl_loss(x_t, x_t, mask, heads=3)) == pytest.approx(0.0, abs=1e-6)  # equal relations
    # padded positions change nothing: the same rows with garbage in the padding
    noisy = x_s.clone()
    noisy[1, 4:] = 100 * torch.randn(2, 8)
    assert torch.allclose(relation_kl_loss(noisy, x_t, mask, heads=2), got)
    assert relation_heads(768, 256) == 32 and relation_heads(768, 288) == 32 and relation_heads(192, 64) == 8


def test_relation_inputs_are_the_layers_own_queries_keys_values():
    """What relation_inputs computes is what the attention layer computes inside the forward (captured by hooks)."""
    torch.manual_seed(1)
    model = BertModel(BertConfig(vocab_size=60, hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
                                 intermediate_size=32, max_position_embeddings=16)).eval()
    seen = {}
    hooks = [getattr(model.encoder.layer[1].attention.self, r).register_forward_hook(
        lambda _m, _i, out, r=r: seen.__setitem__(r, out.detach())) for r in ("query", "key", "value")]
    out = model(input_ids=torch.randint(5, 60, (2, 7)), output_hidden_states=True)
    for h in hooks:
        h.remove()
    for r in ("query", "key", "value"):
        assert torch.allclose(relation_inputs(encoder_layers(model), out.hidden_states, 2, r), seen[r], atol=1e-6)


def test_relation_matches_run_between_other_widths_and_head_counts_and_train_the_student():
    torch.manual_seed(2)
    teacher = BertModel(BertConfig(vocab_size=60, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=16)).eval()
    student = BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=1,
                                   intermediate_size=32, max_position_embeddings=16))
    matches = resolve_matches(["minilmv2_relations"], (4, 2, 48, 16))
    assert matches == minilmv2_relations(4, 2, 48, 16) and [m["relation"] for m in matches] == \
        ["query", "key", "value"] and {m["heads"] for m in matches} == {2}
    check_matches(matches, 4, 2, 48, 16, 4, 1)
    ids = torch.randint(5, 60, (4, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        out_t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out_s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        feats = student_features(matches, torch.nn.ModuleList([torch.nn.Identity()] * 3), out_s.hidden_states,
                                 None, encoder_layers(student))
        loss = sum(match_losses(matches, feats, out_t.hidden_states, None, mask, encoder_layers(teacher)))
        opt.zero_grad()
        loss.backward()
        last = student.encoder.layer[1].attention.self
        assert all(getattr(last, r).weight.grad.abs().sum() > 0 for r in ("query", "key", "value"))
        assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(CorpusError, match="5 relation heads do not divide"):
        check_matches([dict(matches[0], heads=5)], 4, 2, 48, 16, 4, 1)
    with pytest.raises(CorpusError, match="relation match needs"):
        resolve_matches([json.dumps([{"layer_T": 4, "layer_S": 2, "feature": "relation", "loss": "relation_kl",
                                      "relation": "keys", "heads": 2}])])


def test_pretraining_and_task_distillation_with_relations(tiny_teacher, tmp_path, vocab_dir, real_lines, shared_data):
    """train.py --matches minilmv2_relations (teacher 4 x 64 with 4 heads -> student 2 x 32 with 2 heads): the
    relation terms fall; run_classification.py --teacher --matches minilmv2_relations alone trains the student."""
    from minirbt.classification import ClassificationArguments, run_classification
    from minirbt.modeling import save_model_folder
    from minirbt.tokenization import default_vocab_path
    from minirbt.trainer import DistillArguments, train

    dataset = pretraining_dataset([x for x in real_lines if x.strip()][:400], vocab_dir, tmp_path / "corpus")
    config = tmp_path / "student.json"
    config.write_text(json.dumps(tiny_bert(layers=2, hidden=32, heads=2, ffn=64).config.to_dict()))
    summary = train(DistillArguments(teacher=str(tiny_teacher), dataset=str(dataset),
                                     output_dir=str(tmp_path / "out"), student_config=str(config),
                                     matches=["minilmv2_relations"], kd_weight=0, mlm_weight=0, max_steps=40,
                                     batch_size=8, learning_rate=2e-3, save_steps=40, eval_steps=0, logging_steps=1,
                                     min_teacher_accuracy=0))
    history = summary["history"]
    terms = [k for k in history[0] if k.startswith("match")]
    assert len(terms) == 3 and all("relation_kl" in t for t in terms)
    for t in terms:
        assert sum(h[t] for h in history[-5:]) < 0.8 * sum(h[t] for h in history[:5]), t

    # task distillation: a fine-tuned 4 x 64 teacher (4 heads) -> a 2 x 32 student (2 heads), relations only
    reviews = (shared_data / "chnsenticorp" / "ChnSentiCorp_htl_all.csv").read_text(encoding="utf-8").split("\n")
    (tmp_path / "cls.csv").write_text("\n".join(reviews[:1] + [r for r in reviews[1:] if r.strip()][::40][:150]),
                                      encoding="utf-8")
    common = {"task": "chnsenticorp", "train_file": str(tmp_path / "cls.csv"), "dev_file": str(tmp_path / "cls.csv"),
              "max_seq_length": 48, "epochs": 2, "learning_rate": 1e-3}
    run_classification(ClassificationArguments(model=str(tiny_teacher), output_dir=str(tmp_path / "t"), **common))
    save_model_folder(tiny_bert(layers=2, hidden=32, heads=2, ffn=64, seed=5), default_vocab_path(), tmp_path / "s")
    r = run_classification(ClassificationArguments(model=str(tmp_path / "s"), output_dir=str(tmp_path / "d"),
                                                   teacher=str(tmp_path / "t" / "best"), kd_weight=0,
                                                   matches=["minilmv2_relations"], **common))
    from safetensors.torch import load_file

    key = "bert.encoder.layer.1.attention.self.query.weight"
    before, after = load_file(str(tmp_path / "s" / "model.safetensors")), load_file(str(tmp_path / "d" / "best" /
                                                                                     "model.safetensors"))
    assert not torch.allclose(before[key], after[key])  # the relation loss alone trained the student's queries
    assert math.isfinite(r["per_seed"][0]["kl_to_teacher"]["after"])
