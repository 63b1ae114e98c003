"""Recipes as data (pretraining/recipes/*.toml) and the one distillation core every stage uses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from textbrewer.losses import kd_ce_loss
from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

from minirbt.cli import parse
from minirbt.distill import (
    DistillConfig,
    classification_adaptor,
    distill_terms,
    mlm_adaptor,
    nonfinite_terms,
    span_adaptor,
)
from minirbt.matches import PRESETS, build_projections, uniform_hidden_mse
from minirbt.recipe import RECIPES, load_recipe, shell_plan, train_defaults, train_settings
from minirbt.textio import CorpusError
from minirbt.trainer import DistillArguments

WHERE = ["--teacher", "t", "--student_config", "minirbt_h256", "--dataset", "d", "--output_dir", "o"]


def _parse(*argv: str) -> DistillArguments:
    argv = [*argv, *WHERE]
    return parse(DistillArguments, defaults=train_defaults(argv), argv=argv)[0]


def test_shipped_recipes_load_and_quick_writes_only_what_differs():
    recipes = {p.stem: load_recipe(p) for p in RECIPES.glob("*.toml")}
    assert set(recipes) == {"quick", "demo", "minirbt"}
    quick, demo = recipes["quick"], recipes["demo"]
    assert quick.models == demo.models and quick.stages == demo.stages  # inherited (extends = "demo.toml")
    assert quick.distill["temperature"] == demo.distill["temperature"] == 1.0
    assert (quick.distill["max_steps"], demo.distill["max_steps"]) == (20, 500)
    assert quick.finetune["learning_rates"] == demo.finetune["learning_rates"]
    # the stand-in's pretraining: [stand_in] over [distill] (evaluation and checkpoints follow [distill])
    assert train_settings(quick, None) | {} == quick.distill | quick.stand_in
    assert quick.model_config("H256")["hidden_size"] == 64 and quick.model_config("H256")["vocab_size"] == 21128


def test_minirbt_recipe_uses_the_published_presets_which_the_rule_reproduces():
    r = load_recipe("minirbt")
    assert [s.name for s in r.stages if not s.baseline] == ["rbt6", "minirbt_h256", "minirbt_h288"]
    assert PRESETS["L12_L6_hidden_mse"] == uniform_hidden_mse(12, 6, 768, 768)
    assert PRESETS["L6_L6_hidden_mse_H256"] == uniform_hidden_mse(6, 6, 768, 256)
    assert PRESETS["L12_L6_hidden_mse_H288"] == uniform_hidden_mse(12, 6, 768, 288)
    assert shell_plan(r) == ["global_batch 4096", "ta_init rbt6_init rbt6 uniform",
                             "stage rbt6 teacher --student_init rbt6_init",
                             "pass stage2 rbt6 minirbt_h256,minirbt_h288"]
    with pytest.raises(CorpusError, match="must be a shipped config name for distill.sh"):
        shell_plan(load_recipe("demo"))


def test_train_py_takes_a_stage_from_the_recipe_and_flags_win():
    a = _parse("--recipe", "minirbt", "--stage", "minirbt_h256")
    # what the recipe does not set is train.py's one default (MiniRBT's T = 8); what it sets is the recipe's
    assert a.temperature == DistillArguments.__dataclass_fields__["temperature"].default == 8.0
    assert a.bf16 is True and a.max_steps == 100_000 and a.matches == ["L6_L6_hidden_mse_H256"]
    b = _parse("--recipe", "minirbt", "--stage", "minirbt_h256", "--temperature", "3", "--bf16", "false")
    assert b.temperature == 3.0 and b.bf16 is False and b.eval_steps == 1000
    assert _parse().temperature == 8.0 and _parse().bf16 is False  # no recipe: the flags' defaults
    with pytest.raises(CorpusError, match="--stage needs --recipe"):
        _parse("--stage", "rbt6")
    with pytest.raises(CorpusError, match="no stage 'rbt7' .*stages: rbt6, minirbt_h256"):
        _parse("--recipe", "minirbt", "--stage", "rbt7")


def test_temperature_goes_from_the_recipe_file_to_the_loss(tmp_path):
    (tmp_path / "mine.toml").write_text('extends = "%s"\nname = "mine"\n[distill]\ntemperature = 3.0\n'
                                        % (RECIPES / "demo.toml"))
    args = _parse("--recipe", str(tmp_path / "mine.toml"), "--stage", "two_stage_H256")
    config = args.distill_config([])
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    terms = distill_terms(config, {"logits": [s], "losses": {}}, {"logits": [t]}, build_projections([]), None)
    assert config.temperature == 3.0 and torch.allclose(terms["kd"], kd_ce_loss(s, t, 3.0))
    assert not torch.allclose(terms["kd"], kd_ce_loss(s, t, 1.0))


@pytest.mark.parametrize("text, message", [
    ('name = "x"\nsurprise = 1\n', r"unknown key\(s\) surprise"),
    ('extends = "demo.toml"\n[distill]\ntemprature = 2\n', r"\[distill\] temprature: not a train.py setting"),
    ('extends = "demo.toml"\n[distill]\noutput_dir = "o"\n', r"\[distill\] output_dir"),
    ('extends = "demo.toml"\n[finetune]\nepoch = 2\n', r"\[finetune\] epoch: not a run_classification.py"),
    ('extends = "demo.toml"\n[[stages]]\nname = "s"\ntitle = "S"\nteacher = "later"\nstudent_config = "H256"\n',
     "teacher 'later' is neither 'teacher' nor an earlier stage"),
    ('extends = "demo.toml"\n[[stages]]\nname = "s"\ntitle = "S"\nstudent_config = "H512"\n',
     "student_config 'H512' is not in"),
    ('extends = "mine.toml"\n', "'extends' loops back"),
    ('name = [\n', "not valid TOML"),
])
def test_a_bad_recipe_is_refused_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "mine.toml"
    path.write_text(text.replace('"demo.toml"', f'"{RECIPES / "demo.toml"}"'))
    with pytest.raises(CorpusError, match=message) as e:
        load_recipe(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------ the core: one loss for every head
def test_each_head_gives_the_same_terms_through_its_adaptor():
    torch.manual_seed(0)
    config = DistillConfig(2.0, kd_loss_weight=0.7, hard_label_weight=0.3)
    # classification: rows without a gold label (-100) are taught by the teacher only
    ls, lt = torch.randn(4, 3), torch.randn(4, 3)
    batch = {"label": torch.tensor([0, -100, 2, 1])}
    out_s = SequenceClassifierOutput(logits=ls)
    terms = distill_terms(config, classification_adaptor(out_s, batch, labels=True),
                          classification_adaptor(SequenceClassifierOutput(logits=lt), batch, labels=False),
                          build_projections([]), None)
    gold = batch["label"] != -100
    assert torch.allclose(terms["kd"], 0.7 * kd_ce_loss(ls, lt, 2.0))
    assert torch.allclose(terms["hard_label"], 0.3 * F.cross_entropy(ls[gold], batch["label"][gold]))
    # span extraction: start and end count half each
    s0, e0, s1, e1 = (torch.randn(2, 9) for _ in range(4))
    qa = {"start_positions": torch.tensor([1, 4]), "end_positions": torch.tensor([2, 6])}
    terms = distill_terms(config, span_adaptor(QuestionAnsweringModelOutput(start_logits=s0, end_logits=e0), qa,
                                               labels=True),
                          span_adaptor(QuestionAnsweringModelOutput(start_logits=s1, end_logits=e1), qa,
                                       labels=False), build_projections([]), None)
    assert torch.allclose(terms["kd"], 0.7 * (kd_ce_loss(s0, s1, 2.0) + kd_ce_loss(e0, e1, 2.0)) / 2)
    hard = (F.cross_entropy(s0, qa["start_positions"]) + F.cross_entropy(e0, qa["end_positions"])) / 2
    assert torch.allclose(terms["hard_label"], 0.3 * hard)
    # MLM: logits at the masked positions only, the true tokens as labels; no teacher: the hard-label loss alone
    labels = torch.tensor([[-100, 5, -100, 7]])
    lm = torch.randn(2, 10)
    terms = distill_terms(DistillConfig(8.0, kd_loss_weight=0.0, hard_label_weight=1.0),
                          mlm_adaptor((lm, None, None), {"masked_labels": labels[labels != -100]}, labels=True), None,
                          build_projections([]), None)
    assert list(terms) == ["mlm"] and torch.allclose(terms["mlm"], F.cross_entropy(lm, torch.tensor([5, 7])))
    assert nonfinite_terms(terms) == [] and nonfinite_terms({"kd": torch.tensor(math.nan)}) == ["term kd = nan"]


def test_the_arguments_file_of_a_torchrun_launch_round_trips(tmp_path):
    """minirbt.pipeline hands a distillation to torchrun as a JSON file of DistillArguments (train.py --args_json)."""
    import json
    from dataclasses import asdict

    from minirbt.cli import parse_json

    args = DistillArguments(dataset="d", output_dir="o", teacher="t", student_config="minirbt_h256", resume=True,
                            **train_settings(load_recipe("quick"), load_recipe("quick").stage("two_stage_H256")))
    (tmp_path / "a.json").write_text(json.dumps(asdict(args)))
    assert parse_json(DistillArguments, str(tmp_path / "a.json"))[0] == args
    (tmp_path / "b.json").write_text(json.dumps(asdict(args) | {"temprature": 2}))
    with pytest.raises(CorpusError, match="unknown argument.*temprature"):
        parse_json(DistillArguments, str(tmp_path / "b.json"))
