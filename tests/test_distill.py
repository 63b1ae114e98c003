"""Stage 4: the distillation engine on real text with tiny models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script, tiny_bert
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, BertModel

from minirbt.data import build_pretraining_dataset
from minirbt.matches import (
    PRESETS,
    build_projections,
    check_matches,
    encoder_layers,
    match_losses,
    needs_attentions,
    resolve_matches,
    student_features,
)
from minirbt.refs import RefBuilder, write_ref_file
from minirbt.segmentation import make_segmenter
from minirbt.textio import CorpusError
from minirbt.tokenization import LineTokenizer
from minirbt.trainer import DistillArguments, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer, vocab_dir, real_lines):
    d = tmp_path_factory.mktemp("distill_data")
    lines = [x for x in real_lines if x.strip()]
    (d / "train.txt").write_text("\n".join(lines[:1500]) + "\n", encoding="utf-8")
    (d / "dev.txt").write_text("\n".join(lines[1500:1800]) + "\n", encoding="utf-8")
    builder = RefBuilder(LineTokenizer(tokenizer), make_segmenter("jieba"))
    for name in ("train", "dev"):
        write_ref_file(builder, d / f"{name}.txt", d / f"{name}_ref.txt", progress=False)
    build_pretraining_dataset([d / "train.txt"], [d / "train_ref.txt"], vocab_dir, d / "ds", max_seq_length=64,
                              dev_files=[d / "dev.txt"], dev_refs=[d / "dev_ref.txt"])
    return d / "ds"


@pytest.fixture(scope="module")
def student_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "student.json"
    path.write_text(json.dumps(tiny_bert(layers=2, hidden=32, heads=2, ffn=64).config.to_dict()))
    return path


MATCHES = json.dumps([
    {"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": ["linear", 32, 64]},
    {"layer_T": 4, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": ["linear", 32, 64]},
    {"layer_T": 4, "layer_S": 2, "feature": "attention", "loss": "attention_mse_sum", "weight": 10},
])


def args_for(tiny_teacher, dataset, student_config, out, **kw):
    base = dict(teacher=str(tiny_teacher), dataset=str(dataset), output_dir=str(out),
                student_config=str(student_config), matches=[MATCHES], temperature=1.0, mlm_weight=1.0,
                max_steps=8, batch_size=8, learning_rate=1e-3, warmup_ratio=0.1, save_steps=4, eval_steps=0,
                logging_steps=1, seed=3, min_teacher_accuracy=0)  # random tiny teachers
    base.update(kw)
    return DistillArguments(**base)


def test_distillation_lowers_every_loss_and_moves_student_to_teacher(tiny_teacher, dataset, student_config, tmp_path):
    summary = train(args_for(tiny_teacher, dataset, student_config, tmp_path / "out", max_steps=60,
                             eval_steps=60, eval_batches=8, save_steps=60,
                             learning_rate=5e-4))  # MiniRBT's AdamW (no bias correction) steps ~3-4x larger early
    history = summary["history"]
    terms = [k for k in history[0] if k != "step"]
    assert {"kd", "mlm"} <= set(terms) and len(terms) == 5
    for term in terms:
        first = sum(h[term] for h in history[:5]) / 5
        last = sum(h[term] for h in history[-5:]) / 5
        assert last < first, (term, first, last)
    start, end = summary["dev_start"], summary["dev"]
    assert end["kd_loss"] < start["kd_loss"] - 0.05  # closer to the teacher's distributions on dev
    assert end["top1_agreement"] > start["top1_agreement"]
    model = BertModel.from_pretrained(str(tmp_path / "out"))  # the final folder loads as a plain BERT
    assert model.config.num_hidden_layers == 2
    assert (tmp_path / "out" / "runs").is_dir()


def test_bf16_autocast_trains_with_fp32_losses_and_weights(tiny_teacher, dataset, student_config, tmp_path):
    # The same run in fp32 and under bf16 autocast: the first step's loss terms agree to bf16 precision (the
    # forward passes really ran in bf16, the losses were taken in fp32), every term falls, weights stay fp32.
    runs = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        runs[name] = train(args_for(tiny_teacher, dataset, student_config, tmp_path / name, max_steps=30,
                                    save_steps=30, learning_rate=2e-3, bf16=bf16))["history"]
    first32, first16 = runs["fp32"][0], runs["bf16"][0]
    history = runs["bf16"]
    terms = [k for k in first32 if k != "step"]
    assert len(terms) == 5
    for term in terms:
        assert first16[term] == pytest.approx(first32[term], rel=0.05), term
        assert sum(h[term] for h in history[-5:]) < sum(h[term] for h in history[:5]), term
    for term in ("kd", "mlm"):  # the logits came through bf16 matmuls (the embedding output, match0, did not)
        assert first16[term] != first32[term], term
    weights = final_weights(tmp_path / "bf16")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def test_dataloader_workers_change_nothing_but_where_batches_are_made(tiny_teacher, dataset, student_config,
                                                                       tmp_path):
    """Batches depend on (seed, step) only: prepared in 2 worker processes ahead of the loop or in the training
    process, the run ends with the same weights."""
    for workers in (0, 2):
        train(args_for(tiny_teacher, dataset, student_config, tmp_path / f"w{workers}", dataloader_workers=workers,
                       gradient_accumulation_steps=2))
    a, b = final_weights(tmp_path / "w0"), final_weights(tmp_path / "w2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_keeps_the_frozen_teacher_in_bf16(tiny_teacher, dataset, student_config, tmp_path):
    """Under --bf16 the teacher is cast once (autocast would cast its fp32 weights at every forward); the student
    and its optimizer stay fp32."""
    from minirbt.distributed import setup_distributed
    from minirbt.trainer import build_run

    args = args_for(tiny_teacher, dataset, student_config, tmp_path / "x", bf16=True)
    d, device = setup_distributed(None)
    run = build_run(args, d, device, args.distill_config(resolve_matches(args.matches)), resume=False)
    assert {p.dtype for p in run.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in run.student.parameters()} == {torch.float32}


def final_weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_resume_after_kill_is_exact(tiny_teacher, dataset, student_config, tmp_path):
    def cmd_for(out):
        return [sys.executable, str(ROOT / "pretraining/train.py"), "--teacher", str(tiny_teacher), "--dataset",
                str(dataset), "--output_dir", str(out), "--student_config", str(student_config), "--matches",
                MATCHES, "--temperature", "1", "--mlm_weight", "1", "--max_steps", "12", "--batch_size", "8",
                "--learning_rate", "1e-3", "--save_steps", "4", "--eval_steps", "0", "--logging_steps", "1",
                "--seed", "3", "--min_teacher_accuracy", "0"]

    # Both runs in fresh processes: a run inside pytest inherits thread settings and kernel choices from earlier
    # tests, which changes float summation order (seen under CI), so only process-vs-process is bit-comparable.
    straight = tmp_path / "straight"
    subprocess.run(cmd_for(straight), check=True, capture_output=True)
    resumed = tmp_path / "resumed"
    cmd = cmd_for(resumed)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (resumed / "checkpoint-0000004").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "minirbt_training.json").exists(), "finished before the kill"
    subprocess.run(cmd + ["--resume"], check=True, capture_output=True)
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def one_process_equals_two(common: list, tmp_path, port: int) -> dict:
    """train.py with ``common`` once with accumulation 2 and once on 2 gloo processes: the same final weights
    (returned, from the one-process run)."""
    run_script("pretraining/train.py", *common, "--output_dir", tmp_path / "one", "--gradient_accumulation_steps", "2")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(ROOT / "pretraining/train.py"), *common,
                           "--output_dir", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # the logged curves too: each step's terms averaged over both ranks' micro-batches, not rank 0's alone
    one, two = (json.loads((tmp_path / n / "minirbt_training.json").read_text())["history"] for n in ("one", "two"))
    assert len(one) == len(two) > 0 and all(e.keys() == f.keys() for e, f in zip(one, two))
    for e, f in zip(one, two):
        for k, v in e.items():
            assert v == pytest.approx(f[k], rel=1e-4, abs=1e-6), (e["step"], k)
    return a


def test_two_processes_equal_one_with_the_same_global_batch(tiny_teacher, dataset, student_config, tmp_path):
    common = ["--teacher", str(tiny_teacher), "--dataset", str(dataset), "--student_config", str(student_config),
              "--matches", MATCHES, "--temperature", "1", "--mlm_weight", "1", "--max_steps", "4", "--batch_size", "4",
              "--learning_rate", "1e-3", "--save_steps", "4", "--eval_steps", "0", "--seed", "5",
              "--min_teacher_accuracy", "0"]
    a = one_process_equals_two(common, tmp_path, 29533)
    changed = a["bert.encoder.layer.0.attention.self.query.weight"]
    init = BertForMaskedLM(BertConfig.from_json_file(str(student_config)))
    assert not torch.allclose(changed, init.bert.encoder.layer[0].attention.self.query.weight)


def _shapes_for(preset):
    """Teacher/student configs that fit a preset: real widths, tiny everything else."""
    matches = resolve_matches([preset])
    n_t = max(max(m["layer_T"]) if isinstance(m["layer_T"], list) else m["layer_T"] for m in matches)
    n_s = max(max(m["layer_S"]) if isinstance(m["layer_S"], list) else m["layer_S"] for m in matches)
    proj = next((m["proj"] for m in matches if "proj" in m), None)
    h_t = proj[2] if proj else 64
    h_s = proj[1] if proj else 64
    heads = 4 if h_s % 4 == 0 and h_t % 4 == 0 else 2
    return matches, (n_t, h_t, heads), (n_s, h_s, heads)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_a_step(preset):
    matches, (n_t, h_t, a_t), (n_s, h_s, a_s) = _shapes_for(preset)
    attn = "eager" if needs_attentions(matches) else "sdpa"

    def model(n, h, a):
        cfg = BertConfig(vocab_size=50, hidden_size=h, num_hidden_layers=n, num_attention_heads=a,
                         intermediate_size=16, max_position_embeddings=16)
        cfg._attn_implementation = attn
        return BertModel(cfg)

    teacher, student = model(n_t, h_t, a_t), model(n_s, h_s, a_s)
    check_matches(matches, n_t, n_s, h_t, h_s, a_t, a_s)
    proj = build_projections(matches)
    ids = torch.randint(5, 50, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    out_t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=attn == "eager")
    out_s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=attn == "eager")
    features = student_features(matches, proj, out_s.hidden_states, out_s.attentions, encoder_layers(student))
    losses = match_losses(matches, features, out_t.hidden_states, out_t.attentions, mask, encoder_layers(teacher))
    assert len(losses) == len(matches) and all(torch.isfinite(x) and x >= 0 for x in losses)
    sum(losses).backward()
    assert student.embeddings.word_embeddings.weight.grad is not None


def test_attention_ce_is_right_for_probabilities():
    from minirbt.matches import att_prob_ce_loss

    p = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)
    q = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert torch.allclose(att_prob_ce_loss(p, p), entropy, atol=1e-6)  # CE(p, p) = H(p): minimum
    assert att_prob_ce_loss(q, p) > att_prob_ce_loss(p, p)


@pytest.mark.parametrize("shape, temperature", [((7, 11), 8.0), ((2, 5, 13), 2.0), ((150, 21128), 8.0),
                                                ((4, 3), 1.0)])
def test_soft_cross_entropy_equals_textbrewers_value_and_gradient(shape, temperature):
    from textbrewer.losses import kd_ce_loss

    from minirbt.matches import KD_LOSSES

    g = torch.Generator().manual_seed(len(shape) + shape[-1])
    s = (4 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    t = 4 * torch.randn(shape, generator=g, dtype=torch.float64)
    ours, theirs = KD_LOSSES["ce"](s, t, temperature), kd_ce_loss(s, t, temperature)
    (grad_ours,), (grad_theirs,) = torch.autograd.grad(3 * ours, s), torch.autograd.grad(3 * theirs, s)
    assert torch.allclose(ours, theirs, rtol=1e-12) and ours.requires_grad
    assert torch.allclose(grad_ours, grad_theirs, rtol=1e-9, atol=1e-15)
    # a student equal to the teacher is the minimum: zero gradient, the loss is the teacher's entropy
    same = t.clone().requires_grad_()
    (grad_same,) = torch.autograd.grad(KD_LOSSES["ce"](same, t, temperature), same)
    assert grad_same.abs().max() < 1e-15


def test_soft_cross_entropy_hands_textbrewers_cases_to_textbrewer():
    """Per-row temperatures and a teacher that itself needs a gradient take TextBrewer's own function."""
    from textbrewer.losses import kd_ce_loss

    from minirbt.matches import KD_LOSSES

    s, t = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    rows = torch.tensor([1.0, 2.0, 4.0, 8.0])
    assert torch.allclose(KD_LOSSES["ce"](s, t.detach(), rows), kd_ce_loss(s, t.detach(), rows))
    KD_LOSSES["ce"](s, t, 2.0).backward()
    assert t.grad is not None and s.grad is not None


@pytest.mark.parametrize("shape, padded", [((3, 7, 5), False), ((3, 7, 5), True), ((2, 128, 768), True),
                                           ((4, 6), True)])
def test_hidden_mse_equals_textbrewers_value_and_gradient(shape, padded):
    from textbrewer.losses import hid_mse_loss

    from minirbt.matches import MATCH_LOSSES

    g = torch.Generator().manual_seed(shape[-1] + padded)
    s = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = None
    if padded:  # rows of different lengths, each with padding, as a padded batch's attention mask
        mask = (torch.arange(shape[-2]) < torch.randint(1, shape[-2], shape[:-2] + (1,), generator=g)).long()
    ours, theirs = MATCH_LOSSES["hidden_mse"](s, t, mask=mask), hid_mse_loss(s, t, mask)
    (grad_ours,), (grad_theirs,) = torch.autograd.grad(3 * ours, s), torch.autograd.grad(3 * theirs, s)
    assert ours.dtype == torch.float64 and torch.allclose(ours, theirs, rtol=1e-12)
    assert torch.allclose(grad_ours, grad_theirs, rtol=1e-9, atol=1e-15)
    if padded:  # padding gets no gradient
        assert (mask == 0).any() and grad_ours[mask == 0].abs().max() == 0


def test_hidden_mse_of_a_bf16_student_is_fp32_with_an_exact_token_count():
    """Under autocast the projected student feature is bf16: the loss is fp32 and its gradient comes back in
    bf16; the token count stays exact (TextBrewer's is the bf16 rounding of 1,023, i.e. 1,024)."""
    from textbrewer.losses import hid_mse_loss

    from minirbt.matches import MATCH_LOSSES

    g = torch.Generator().manual_seed(5)
    s = torch.randn(1, 1024, 8, generator=g).bfloat16().requires_grad_()
    t = torch.randn(1, 1024, 8, generator=g)
    mask = torch.ones(1, 1024, dtype=torch.long)
    mask[0, -1] = 0
    ours = MATCH_LOSSES["hidden_mse"](s, t, mask=mask)
    exact = hid_mse_loss(s.detach().double(), t.double(), mask)  # float64: the count is exact there
    assert ours.dtype == torch.float32 and torch.allclose(ours.double(), exact, rtol=1e-6)
    ours.backward()
    assert s.grad.dtype == torch.bfloat16 and s.grad[0, -1].abs().max() == 0
    theirs_bf16 = hid_mse_loss(s.detach(), t, mask)
    assert not torch.allclose(theirs_bf16.double(), exact, rtol=1e-4)  # 1,023 x 8 counted as 1,024 x 8


def test_hidden_mse_hands_textbrewers_cases_to_textbrewer():
    """A teacher that needs a gradient, or shapes that broadcast, take TextBrewer's own function."""
    from textbrewer.losses import hid_mse_loss

    from minirbt.matches import MATCH_LOSSES

    s, t = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    MATCH_LOSSES["hidden_mse"](s, t, mask=torch.ones(2, 3)).backward()
    assert t.grad is not None and s.grad is not None
    row = torch.randn(1, 3, 4)
    with pytest.warns(UserWarning, match="different to the input size"):  # TextBrewer's (F.mse_loss's) warning
        assert torch.equal(MATCH_LOSSES["hidden_mse"](s, row), hid_mse_loss(s, row))


@pytest.mark.parametrize("case", ["vocab", "layer", "proj", "columns", "checkpoint", "both_students", "heads"])
def test_clear_errors(case, tiny_teacher, dataset, student_config, tmp_path, vocab_dir):
    kw = {}
    message = {
        "vocab": "vocab mismatch", "layer": r"layer_S \[3\] out of range 0\.\.2",
        "proj": r"does not fit student width 32", "columns": "lacks columns",
        "checkpoint": "cannot load checkpoint", "both_students": "exactly one of",
        "heads": "compares heads one to one",
    }[case]
    if case == "vocab":
        cfg = json.loads(student_config.read_text())
        cfg["vocab_size"] = 8000
        (tmp_path / "s.json").write_text(json.dumps(cfg))
        kw["student_config"] = str(tmp_path / "s.json")
    elif case == "layer":
        kw["matches"] = ['[{"layer_T": 4, "layer_S": 3, "feature": "hidden", "loss": "hidden_mse", '
                         '"proj": ["linear", 32, 64]}]']
    elif case == "proj":
        kw["matches"] = ['[{"layer_T": 4, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", '
                         '"proj": ["linear", 256, 768]}]']
    elif case == "heads":
        kw["matches"] = ["L4_attention_mse"]
    elif case == "columns":
        import datasets

        bad = tmp_path / "bad_ds"
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(bad))
        (bad / "minirbt_dataset.json").write_text((dataset / "minirbt_dataset.json").read_text())
        kw["dataset"] = str(bad)
    elif case == "checkpoint":
        out = tmp_path / "ck"
        train(args_for(tiny_teacher, dataset, student_config, out, max_steps=4, save_steps=2))
        (out / "checkpoint-0000004" / "model.safetensors").write_bytes(b"not a safetensors file")
        kw.update(output_dir=str(out), resume=True, max_steps=6, accept_changed=["max_steps"])
    elif case == "both_students":
        kw["student_init"] = str(tiny_teacher)
    with pytest.raises(CorpusError, match=message):
        train(args_for(tiny_teacher, kw.pop("dataset", dataset), kw.pop("student_config", student_config),
                       kw.pop("output_dir", tmp_path / "o"), **kw))


def test_distill_sh_explains_a_missing_teacher(tmp_path):
    for cwd, script in ((ROOT, "pretraining/distill.sh"), (ROOT / "pretraining", "distill.sh")):
        proc = subprocess.run(["sh", script], cwd=cwd, capture_output=True, text=True,
                              env=dict(os.environ, TEACHER=str(tmp_path / "nope")))
        assert proc.returncode == 2 and "no teacher at" in proc.stderr and "config.json" in proc.stderr


def test_distill_sh_dry_run_for_two_nodes_of_eight_gpus(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text("{}")
    (tmp_path / "ds").mkdir()
    base = dict(os.environ, DRY_RUN="1", TEACHER=str(tmp_path / "teacher"), DATASET=str(tmp_path / "ds"),
                OUT=str(tmp_path / "out"), NPROC="8", PYTHON="python3")

    def dry(**env):
        return subprocess.run(["sh", str(ROOT / "pretraining/distill.sh")], capture_output=True, text=True,
                              env=base | env, timeout=60)

    nodes = {}
    for rank in ("0", "1"):
        proc = dry(NNODES="2", NODE_RANK=rank, MASTER_ADDR="10.1.2.3", MASTER_PORT="29555")
        assert proc.returncode == 0, proc.stderr
        nodes[rank] = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
        assert "global batch 4096 = 32 per GPU x 8 GPUs x 2 nodes x 8 accumulation" in proc.stdout
    launch = (f"python3 -m torch.distributed.run --nnodes 2 --node_rank {{}} --nproc_per_node 8 --master_addr "
              f"10.1.2.3 --master_port 29555 {ROOT}/pretraining/train.py")
    recipe = f"--recipe {ROOT}/pretraining/recipes/minirbt.toml --stage "
    students = tmp_path / "out" / ".stage2.students.json"
    for rank, cmds in nodes.items():
        # teacher assistant (or waiting for it), stage 1, stage 2's --students file, stage 2: H256 and H288
        # trained from one RBT6 forward per batch
        assert len(cmds) == 4
        for cmd, stage in zip((cmds[1], cmds[3]), ("rbt6", "minirbt_h256")):
            assert cmd.startswith(launch.format(rank) + " " + recipe + stage + " ")
            assert "--gradient_accumulation_steps 8 " in cmd and "--resume" in cmd and "--batch_size 32 " in cmd
            # the recipe's settings are train.py's to read: none is repeated on the command line
            assert "--temperature" not in cmd and "--bf16" not in cmd and "--max_steps" not in cmd
        assert cmds[2].endswith(f"python3 -m minirbt.recipe students {ROOT}/pretraining/recipes/minirbt.toml stage2 "
                                f"{tmp_path}/out {students}")
        assert f"--students {students} " in cmds[3] and "--output_dir" not in cmds[3]
    # what that command writes, train.py reads: each student's folder, shape and matches
    subprocess.run([sys.executable, "-m", "minirbt.recipe", "students", str(ROOT / "pretraining/recipes/minirbt.toml"),
                    "stage2", str(tmp_path / "out"), str(students)], check=True, cwd=ROOT)
    from minirbt.pretrain_setup import read_students

    listed = read_students(DistillArguments(teacher=str(tmp_path / "out" / "rbt6"), dataset=str(tmp_path / "ds"),
                                            students=str(students)))
    assert [(a.output_dir, a.student_config, a.matches) for a in listed] == [
        (str(tmp_path / "out" / n), n, [f"L6_L6_hidden_mse_H{n[-3:]}"]) for n in ("minirbt_h256", "minirbt_h288")]
    assert nodes["0"][0].startswith(f"python3 {ROOT}/scripts/init_checkpoint_TA.py --teacher {tmp_path}/teacher")
    assert nodes["1"][0].endswith(f"python3 -m minirbt.stages wait 'model folder' {tmp_path}/out/rbt6_init "
                                  "--timeout 86400")
    assert "--teacher " + str(tmp_path / "out" / "rbt6") in nodes["0"][3]
    # one node: torchrun's --standalone (no fixed port shared with another job); accumulation from the GPUs
    one = dry(NPROC="8", TEMPERATURE="4", BF16="0", STEPS="10")
    assert "-m torch.distributed.run --standalone --nproc_per_node 8 " in one.stdout
    assert "--gradient_accumulation_steps 16 " in one.stdout
    assert one.stdout.count(" --max_steps 10 --temperature 4 --bf16 false") == 2  # overrides, every train.py run
    # a global batch that does not divide is refused, not rounded; several nodes need node 0's address
    bad = dry(PER_DEVICE_BATCH="48")
    assert bad.returncode == 2 and "not a multiple of PER_DEVICE_BATCH x NPROC x NNODES" in bad.stderr
    assert "MASTER_ADDR" in dry(NNODES="2").stderr
    assert "NODE_RANK must be 0..1" in dry(NNODES="2", NODE_RANK="2", MASTER_ADDR="x").stderr


def test_waiting_node_returns_once_node_0_wrote_the_teacher_assistant(tmp_path):
    import threading

    from minirbt import stages

    folder = tmp_path / "rbt6_init"

    def write_later():
        time.sleep(0.5)
        folder.mkdir()
        stages.write_record(stages.MODEL, folder, {"settings": {}}, complete=True)

    threading.Thread(target=write_later).start()
    assert stages.wait_for(stages.MODEL, folder, timeout=30, poll=0.1)["complete"]
    with pytest.raises(CorpusError, match="filesystem every node sees"):
        stages.wait_for(stages.MODEL, tmp_path / "never", timeout=0.3, poll=0.1)


# ------------------------------------------------------------------ multi-GPU / multi-node paths, on CPU and gloo
def test_matches_only_distillation_on_two_processes_equals_one(tiny_teacher, dataset, student_config, tmp_path):
    """No KD and no MLM loss: the LM head gets no gradient. Under DDP that used to stop the run at step 2."""
    common = ["--teacher", str(tiny_teacher), "--dataset", str(dataset), "--student_config", str(student_config),
              "--matches", MATCHES, "--kd_weight", "0", "--mlm_weight", "0", "--max_steps", "3", "--batch_size",
              "4", "--learning_rate", "1e-3", "--save_steps", "3", "--eval_steps", "0", "--seed", "6",
              "--min_teacher_accuracy", "0"]
    a = one_process_equals_two(common, tmp_path, 29541)
    torch.manual_seed(6)  # the trainer's seeded init: the head kept it, the encoder moved away from it
    init = BertForMaskedLM(BertConfig.from_json_file(str(student_config))).state_dict()
    assert torch.equal(a["cls.predictions.transform.dense.weight"], init["cls.predictions.transform.dense.weight"])
    assert not torch.equal(a["bert.encoder.layer.0.attention.self.query.weight"],
                           init["bert.encoder.layer.0.attention.self.query.weight"])


def test_a_rank_that_fails_while_loading_stops_every_node_with_its_message(tiny_teacher, dataset, student_config,
                                                                           tmp_path):
    """Node 1 fails after loading its run (a disk error), before the student is wrapped for DDP: node 0 must stop
    naming rank 1's error, not wait inside DDP's constructor for a peer that never comes."""
    base = ["--teacher", str(tiny_teacher), "--dataset", str(dataset), "--student_config", str(student_config),
            "--matches", MATCHES, "--batch_size", "4", "--max_steps", "2", "--save_steps", "2", "--eval_steps", "0",
            "--seed", "7", "--min_teacher_accuracy", "0", "--output_dir", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MINIRBT_DIST_TIMEOUT_MINUTES="3")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                               "29551", str(ROOT / "pretraining/train.py"), *base],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env | ({"MINIRBT_FAULT": "run.built:1:enospc"} if rank else {}))
             for rank in (0, 1)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode != 0 for p in procs)
    err0 = results[0][1]
    assert "failed on rank 1 (of 2): OSError" in err0 and "No space left" in err0, err0[-2000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_nodes_that_see_different_output_folders_stop_together(tiny_teacher, dataset, student_config, tmp_path):
    """Node-local disks: node 0 finds a checkpoint, node 1 an empty folder. Both must stop with the
    shared-filesystem message (not hang, not train different loops), and node 0's checkpoint stays as it was."""
    base = ["--teacher", str(tiny_teacher), "--dataset", str(dataset), "--student_config", str(student_config),
            "--matches", MATCHES, "--mlm_weight", "1", "--batch_size", "4", "--save_steps", "2", "--eval_steps",
            "0", "--seed", "7", "--min_teacher_accuracy", "0"]
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    # one process with accumulation 2 = the same run as 2 processes (its record says 2 micro-batches per step)
    run_script("pretraining/train.py", *base, "--max_steps", "2", "--gradient_accumulation_steps", "2",
               "--output_dir", node0)
    before = {p.name: p.stat().st_mtime_ns for p in node0.rglob("*")}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                               "29547", str(ROOT / "pretraining/train.py"), *base, "--max_steps", "4", "--resume",
                               "--accept_changed", "max_steps", "--output_dir", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank, out in enumerate((node0, node1))]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode != 0
        assert "resume_from_step=2" in err and "resume_from_step=0" in err, err[-2000:]
        assert "must be on a filesystem every node sees" in err, err[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in node0.rglob("*")} == before
    assert not any(node1.iterdir()) if node1.exists() else True


class HostSyncs(torch.overrides.TorchFunctionMode):
    """Counts the calls that make the host wait for the device: reading values (item, tolist, bool(), ...),
    data-dependent shapes (nonzero, boolean-mask indexing) and copies to the host."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "masked_select", "unique", "equal",
             "allclose"}

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        counted = name in self.READS
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            counted = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        on_device = bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"
        targets = [str(a) for a in (*args[1:], *(kwargs or {}).values())]
        if on_device and (name in ("cpu", "numpy") or name == "to" and "cpu" in targets):
            counted = True  # a copy to the host
        if counted:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def test_host_syncs_per_step_do_not_grow_with_loss_terms_or_accumulation(tiny_teacher, dataset, student_config,
                                                                         tmp_path):
    from minirbt.distributed import Dist
    from minirbt.pretrain_setup import check_inputs, run_matches
    from minirbt.step_batches import StepBatches
    from minirbt.trainer import build_run, forward_backward, update

    with HostSyncs() as probe:  # the counter sees a sync when there is one
        torch.ones(2).sum().item()
        torch.ones(3)[torch.tensor([True, False, True])]
    assert probe.total == 2
    one_match = json.dumps(json.loads(MATCHES)[1:2])
    counts = {}
    for label, matches, weights, accumulation, padded in (("1 match alone, A=1", one_match, 0.0, 1, False),
                                                          ("3 matches + KD + MLM, A=4", MATCHES, 1.0, 4, True)):
        args = args_for(tiny_teacher, dataset, student_config, tmp_path / label, matches=[matches],
                        gradient_accumulation_steps=accumulation, batch_size=4, kd_weight=weights,
                        mlm_weight=weights)
        check_inputs(args)
        run = build_run(args, Dist(), torch.device("cpu"), args.distill_config(run_matches(args)), resume=False)
        step_batches = StepBatches(run.data["train"], run.tokenizer, args, 0, 1)
        steps = []
        for _ in range(2):
            batches = step_batches[run.step]
            if padded:  # padding takes the other mask path
                for b in batches:
                    b["attention_mask"][0, -3:] = 0
                    b["padded"] = True
            with HostSyncs() as syncs:
                terms, _, _ = update(run, *forward_backward([run], batches)[0])
            run.step += 1
            steps.append(syncs.calls)
        assert len(terms) == (1 if accumulation == 1 else 5)  # kd + mlm + 3 matches
        counts[label] = steps
    flat = [sum(c.values()) for steps in counts.values() for c in steps]
    assert max(flat) <= 2 and len(set(flat)) == 1, counts


def test_torch_compile_trains_the_same_student(tiny_teacher, dataset, student_config, tmp_path):
    """--torch_compile (aot_eager here: dynamo's trace and AOT autograd without C++ code generation) compiles
    the encoders in place: the same weights as eager up to rounding, checkpoints with eager names."""
    from torch._dynamo.utils import counters

    counters.clear()
    for name, compiled in (("eager", False), ("compiled", True)):
        train(args_for(tiny_teacher, dataset, student_config, tmp_path / name, max_steps=4, save_steps=2,
                       torch_compile=compiled, torch_compile_backend="aot_eager", dataloader_workers=0))
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # dynamo did trace the compiled run
    a, b = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    assert BertForMaskedLM.from_pretrained(str(tmp_path / "compiled" / "checkpoint-0000002")).config.hidden_size == 32
