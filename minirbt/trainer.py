"""The MLM distillation loop (stage 4): one file, top to bottom, nanoGPT style.

Why a hand-written loop rather than ``accelerate``/``Trainer``: exact resume and
exact 1-vs-N-process equivalence come from deriving *everything random* from
``(seed, step, micro-batch)`` - the data order, the masks, dropout - so a
checkpoint needs only the step, the weights and the optimizer; neither library
exposes that, and the loop is short.

The data order and masks of every (step, micro-batch) are ``minirbt.step_batches``'s; the
dropout of a micro-batch is seeded the same way, here. One teacher pass can train several
students (:func:`train_students`: e.g. MiniRBT-H256 and H288 from RBT6), each with its own
matches, optimizer, checkpoints and output folder; a single-student run is that with one.

Loss (``minirbt.distill``, shared with fine-tuning) = ``kd_weight`` x soft
cross-entropy(student, teacher; T) at the masked positions + ``mlm_weight`` x
cross-entropy with the true tokens + every intermediate match (``minirbt.matches``). The LM heads run only on the masked
positions (~15% of tokens: the vocabulary projection dominates otherwise). Losses
are computed in fp32; ``--bf16`` autocasts the forward passes (CUDA and CPU).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm
from transformers import BertForMaskedLM

from minirbt import stages
from minirbt.checkpoints import checkpoints, load_checkpoint_state, pretraining_kept, save_checkpoint
from minirbt.cli import check_device, warn_emulated_bf16
from minirbt.collator import ChineseWWMCollator
from minirbt.data import load_pretraining_dataset
from minirbt.distill import DistillConfig, distill_terms, mlm_adaptor, nonfinite_values, term_values
from minirbt.distributed import Dist, on_every_rank, setup_distributed, wrap_ddp
from minirbt.dropout import use_cpu_dropout
from minirbt.faults import fault_point
from minirbt.host_memory import keep_freed_host_memory
from minirbt.matches import build_projections, encoder_layers, student_features
from minirbt.mlm_eval import check_teacher, evaluate_runs, host_batch, masked_lm_forward, teacher_forward, to_device
from minirbt.modeling import load_config, load_mlm, write_model_files
from minirbt.optim import Optimization
from minirbt.pretrain_setup import (
    SUMMARY_NAME,
    DistillArguments,
    Plan,
    check_one_pass,
    finished_summary,
    plan_runs,
    take_run,
)
from minirbt.step_batches import step_loader, sub_seed
from minirbt.textio import CorpusError
from minirbt.tokenization import load_tokenizer
from minirbt.train_progress import Progress


# ------------------------------------------------------------------ the student side
class Student(nn.Module):
    """Student + match projections: the trained parameters, in one module for DDP, and a forward that runs all of
    them (DDP's reducer expects every trained parameter to be used inside forward, the projections included)."""

    def __init__(self, model: BertForMaskedLM, projections: nn.ModuleList, config: DistillConfig):
        super().__init__()
        use_cpu_dropout(model)  # same dropout, cheaper masks on the CPU (minirbt.dropout)
        self.model = model
        self.projections = projections
        self.matches = config.intermediate_matches
        self.logits = config.needs_logits  # a matches-only run builds no LM-head output

    def forward(self, batch: dict, hidden: bool, attentions: bool):
        """(LM logits at the masked positions or None, hidden states, attentions, each match's student feature)."""
        logits, hs, att = masked_lm_forward(self.model, batch, hidden, attentions, self.logits)
        if not self.matches:
            return logits, hs, att, []
        return logits, hs, att, student_features(self.matches, self.projections, hs, att,
                                                 encoder_layers(self.model))


def teacher_outputs(teacher: BertForMaskedLM | None, batch: dict, configs: list[DistillConfig], autocast):
    """The frozen teacher's forward on one micro-batch, with every output that one of ``configs`` (the students
    trained from this pass) reads; None without a teacher."""
    if teacher is None:
        return None
    with autocast:
        return teacher_forward(teacher, batch, any(c.needs_hidden for c in configs),
                               any(c.needs_attentions for c in configs),
                               logits=any(bool(c.kd_loss_weight) for c in configs))


def distill_losses(teacher: BertForMaskedLM | None, student: nn.Module, batch: dict, config: DistillConfig,
                   autocast, out_T=None) -> dict[str, torch.Tensor]:
    """Every weighted loss term of one micro-batch (fp32). ``student``: a :class:`Student`, maybe DDP-wrapped;
    ``out_T``: the teacher's outputs when they are shared by several students (else computed here)."""
    if out_T is None:
        out_T = teacher_outputs(teacher, batch, [config], autocast)
    with autocast:
        logits, hs, att, features = student(batch, config.needs_hidden, config.needs_attentions)
    adapted_T = mlm_adaptor(out_T, batch, labels=False) | {"layers": encoder_layers(teacher)} \
        if teacher is not None else None
    adapted_S = mlm_adaptor((logits, hs, att), batch, labels=bool(config.hard_label_weight))
    return distill_terms(config, adapted_S | {"features": features}, adapted_T, None, batch["attention_mask"])


# ------------------------------------------------------------------ the run
@dataclass
class Run:
    """What a training run holds while it trains; the step and curves are restored on resume."""

    args: DistillArguments
    d: Dist
    device: torch.device
    config: DistillConfig
    teacher: BertForMaskedLM | None
    student: Student
    ddp_student: nn.Module  # the student, DDP-wrapped on several processes
    optimization: Optimization
    tokenizer: object
    vocab_file: Path
    data: dict
    autocast: object
    step: int = 0
    history: list[dict] = field(default_factory=list)  # train curves; dev curves; skipped steps
    dev_history: list[dict] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def dev_set(self):
        """The dev split when evaluation is on and the dataset has one (else None)."""
        dev = self.data.get("validation")
        return dev if self.args.eval_steps and dev is not None and len(dev) else None

    def logs(self) -> dict:
        return {"history": self.history, "dev_history": self.dev_history, "skipped": self.skipped}



def load_teacher(args: DistillArguments, attn: str | None, device: torch.device) -> BertForMaskedLM:
    """The teacher, frozen; in bf16 under --bf16."""
    teacher = load_mlm(args.teacher, "teacher", attn, require_head=True).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if args.bf16:  # frozen: cast once, not by autocast at every forward (its matmuls see the same bf16 weights)
        teacher = teacher.to(torch.bfloat16)
    if args.torch_compile:
        teacher.bert.compile(backend=args.torch_compile_backend)
    return teacher


def build_run(args: DistillArguments, d: Dist, device: torch.device, config: DistillConfig, resume: bool,
              teacher: BertForMaskedLM | None = None) -> Run:
    """Models (the teacher frozen; ``teacher``: one already loaded, shared by several students), optimizer and
    schedule, the newest checkpoint when resuming, and the data."""
    attn = config.attn_implementation
    if teacher is None and args.teacher:
        teacher = load_teacher(args, attn, device)
    torch.manual_seed(args.seed)  # random student init is the same on every rank
    if args.student_init:
        model = load_mlm(args.student_init, "student", attn)
    else:
        model_config = load_config(args.student_config)
        if attn:
            model_config._attn_implementation = attn
        model = BertForMaskedLM(model_config)
    if args.torch_compile:  # in place: the state dict keeps its names (checkpoints load into an eager model)
        model.bert.compile(backend=args.torch_compile_backend)
    vocab_dir = args.tokenizer or args.teacher or args.student_init
    student = Student(model, build_projections(config.intermediate_matches), config).to(device)
    optimization = Optimization(student.model, student.projections, lr=args.learning_rate,
                                weight_decay=args.weight_decay, eps=args.adam_epsilon,
                                bias_correction=args.adam_bias_correction,
                                warmup_steps=int(args.warmup_ratio * args.max_steps), total_steps=args.max_steps,
                                max_grad_norm=args.max_grad_norm)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    run = Run(args, d, device, config, teacher, student, student, optimization, load_tokenizer(vocab_dir),
              Path(vocab_dir) / "vocab.txt", load_pretraining_dataset(args.dataset), autocast)
    if resume:
        restore(run, attn)
    frozen = freeze_unused(run)
    if frozen and d.main:
        print(f"{len(frozen)} parameter tensors get no gradient from this run's losses and keep their values "
              f"(e.g. {', '.join(frozen[:3])})", flush=True)
    fault_point("run.built")
    return run


def freeze_unused(run: Run) -> list[str]:
    """Freeze the student's parameters that no loss reaches (the LM head of a matches-only run, layers above the
    last one a match reads), found by one probe backward on the first examples; returns their names.
    One process leaves such parameters as they are (AdamW skips parameters without a gradient); under DDP a
    trained parameter without a gradient stops the run at step 2, so freezing keeps N processes equal to one."""
    args = run.args
    collator = ChineseWWMCollator(run.tokenizer, args.mlm_probability, seed=args.seed)
    n = min(args.batch_size, len(run.data["train"]))
    batch = to_device(host_batch(collator, [run.data["train"][i] for i in range(n)]), run.device)
    trained = [(name, p) for name, p in run.student.named_parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):  # no draw is used up
        terms = distill_losses(run.teacher, run.student, batch, run.config, run.autocast)
        grads = torch.autograd.grad(sum(terms.values()), [p for _, p in trained], allow_unused=True)
    unused = [(name, p) for (name, p), g in zip(trained, grads) if g is None]
    for _, p in unused:
        p.requires_grad_(False)
    return [name for name, _ in unused]


def restore(run: Run, attn: str | None) -> None:
    """The newest checkpoint's weights, optimizer, schedule, step and curves (none yet: step 0)."""
    found = checkpoints(run.out)
    if not found:
        if run.d.main:
            print(f"--resume: no checkpoint in {run.out}, starting from step 0", flush=True)
        return
    state = load_checkpoint_state(found[-1])
    run.student.model.load_state_dict(load_mlm(found[-1], "checkpoint", attn).state_dict())
    run.student.projections.load_state_dict(state["projections"])
    run.optimization.load_state_dict(state)
    run.step = int(state["step"])  # <= max_steps: decide_run refused a checkpoint beyond it
    logs = state.get("logs", {})
    run.history, run.dev_history = list(logs.get("history", [])), list(logs.get("dev_history", []))
    run.skipped = list(logs.get("skipped", []))
    if run.d.main:
        print(f"resuming from {found[-1]} (step {run.step})", flush=True)


# ------------------------------------------------------------------ one optimizer step


def forward_backward(runs: list[Run], batches: list[dict]) -> list[tuple[list[str], torch.Tensor]]:
    """Forward and backward of the step's micro-batches for each run (students of one teacher pass: the teacher
    runs once per micro-batch): per run, (term names, their values averaged over the micro-batches as one vector
    on the device). Nothing here waits for the device; :func:`update` reads the vector once."""
    first = runs[0]
    d, A = first.d, len(batches)
    totals: list = [None] * len(runs)
    names: list[list[str]] = [[] for _ in runs]
    for m, host in enumerate(batches):
        batch = to_device(host, first.device)
        out_T = teacher_outputs(first.teacher, batch, [r.config for r in runs], first.autocast)
        sync = m == A - 1 or d.world == 1
        for i, run in enumerate(runs):
            # dropout: the same on any number of ranks, and the same as this student's single-student run
            torch.manual_seed(sub_seed(run.args.seed, run.step, d.rank * A + m))
            with run.ddp_student.no_sync() if not sync else nullcontext():
                terms = distill_losses(run.teacher, run.ddp_student, batch, run.config, run.autocast, out_T)
                # even when a term is NaN: every DDP rank runs the same collectives; update() decides
                (sum(terms.values()) / A).backward()
            values = term_values(terms) / A
            totals[i], names[i] = (values if totals[i] is None else totals[i] + values), list(terms)
    return list(zip(names, totals))


def update(run: Run, names: list[str], total: torch.Tensor) -> tuple[dict[str, float], float, bool]:
    """Clip, then apply the step, or skip it (--on_nonfinite skip) or stop (stop) when any rank saw a NaN/inf;
    every rank decides after the same all-reduce, which also averages the terms over the ranks (what one process
    with accumulation logs). The schedule advances either way. The step's one read-back from the device is
    here. Returns (terms, gradient norm, skipped)."""
    args, d = run.args, run.d
    grad_norm = run.optimization.clip().detach().float().reshape(1).to(total.device)  # equal on every rank
    local_bad = (~torch.isfinite(torch.cat([total, grad_norm]))).any().float().reshape(1)
    shared = torch.cat([total / d.world, local_bad])
    if d.world > 1:  # a sum: the terms' mean, and > 0 where any rank saw a NaN/inf (which then shows in the mean)
        dist.all_reduce(shared)
    *values, any_bad, norm = torch.cat([shared, grad_norm]).tolist()
    terms = dict(zip(names, values))
    bad_terms = nonfinite_values(terms)
    bad = bad_terms + ([] if math.isfinite(norm) else [f"gradient norm = {norm}"])
    skip = any_bad > 0
    where = bad[0] if bad else "non-finite on another rank"
    if skip and args.on_nonfinite == "stop":
        what = "loss" if bad_terms else "gradient" if bad else "values"
        raise CorpusError(f"non-finite {what} at step {run.step + 1}: {where}; the weights were not updated; "
                          f"{pretraining_kept(run.out)} (--on_nonfinite skip skips such steps)")
    if skip:
        run.skipped.append(run.step + 1)
        if d.main:
            tqdm.write(f"step {run.step + 1}: skipped ({where}); {len(run.skipped)} skipped so far")
        if len(run.skipped) > args.max_skipped_steps:
            raise CorpusError(f"{len(run.skipped)} steps had non-finite losses or gradients (first: "
                              f"{run.skipped[:5]}), more than --max_skipped_steps {args.max_skipped_steps}: "
                              f"stopping; {pretraining_kept(run.out)}")
    run.optimization.step(update=not skip)
    return terms, norm, skip


# ------------------------------------------------------------------ logging, evaluation, checkpoints
def due(run: Run, every: int) -> bool:
    return run.step % every == 0 or run.step == run.args.max_steps


def checkpoint(run: Run) -> None:
    """Rank 0 writes the checkpoint (atomically); every rank waits for it, and stops too when it fails."""
    def save() -> None:
        if not run.d.main:
            return
        try:
            save_checkpoint(run.out, run.step, run.student.model, run.student.projections, run.optimization,
                            run.vocab_file, run.args, run.args.save_total_limit, run.logs())
        except OSError as e:  # full disk, quota, permissions: the temp dir is gone, older ones intact
            found = checkpoints(run.out)
            kept = f"the newest complete checkpoint is {found[-1]}" if found else "no earlier checkpoint"
            raise CorpusError(f"could not write the checkpoint of step {run.step} in {run.out}: {e}; {kept} "
                              f"(untouched). Free space and re-run with --resume.") from None

    on_every_rank(run.d, save, f"writing the checkpoint of step {run.step}")


def write_final(run: Run, summary: dict) -> None:
    """The final student: a complete model folder at the top of output_dir (each file replaced atomically), then
    the run's record says complete."""
    with tempfile.TemporaryDirectory(dir=run.out, prefix=".final-") as tmp_name:
        tmp = Path(tmp_name)
        write_model_files(run.student.model, run.vocab_file, tmp)
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):  # config last
            os.replace(f, run.out / f.name)
    stages.mark_complete(stages.TRAINING_RUN, run.out)  # last: only now is the run "done"


def summary_lines(output_dir: str, summary: dict) -> list[str]:
    """What train.py prints when a run ends (or is skipped)."""
    if summary.get("skipped"):
        return [f"{output_dir}: done, skipped (a finished run with the same settings and inputs; "
                f"--overwrite_output to train it again)"]
    dev = ["dev: " + ", ".join(f"{k} {v:.4g}" for k, v in summary["dev"].items())] if summary["dev"] else []
    return dev + [f"{output_dir}: student after {summary['steps']} steps ({summary['seconds']:.0f} s)"]


# ------------------------------------------------------------------ the loop
def train(args: DistillArguments) -> dict:
    """One student (train.py's usual run): its summary."""
    return train_students([args])[0]


def train_students(students: list[DistillArguments]) -> list[dict]:
    """Train several students from one teacher pass per micro-batch (each its own matches, projections,
    optimizer, checkpoints and output folder; the data, masks and steps shared: ``check_one_pass``). Each
    student's weights are those of its own single-student run. A finished student is skipped; the others resume
    from their own newest checkpoints, a student behind the others training alone until it catches up."""
    check_one_pass(students)
    first = students[0]
    check_device(first.device)
    keep_freed_host_memory()  # no page faults on a step's own activations (minirbt.host_memory)
    d, device = setup_distributed(first.device)  # first: a check that fails on one node must stop every node
    if d.main:
        warn_emulated_bf16(device, first.bf16)
    plans = plan_runs(students, d)
    summaries: list[dict | None] = [finished_summary(p.args) if p.claim.state == "done" else None for p in plans]
    todo = [p for p in plans if p.claim.state != "done"]
    if todo:
        configs = [p.args.distill_config(p.matches) for p in todo]
        attn = "eager" if any(c.attn_implementation for c in configs) else None
        teacher = on_every_rank(d, lambda: load_teacher(first, attn, device) if first.teacher else None,
                                "loading the teacher")
        runs = [on_every_rank(d, lambda p=p, c=c: build_run(p.args, d, device, c, p.claim.state == "resume",
                                                            teacher), f"loading {p.args.output_dir}")
                for p, c in zip(todo, configs)]
        for run in runs:  # after every rank has built its run: DDP's constructor has collectives of its own
            run.ddp_student = wrap_ddp(run.student, d, device)
        done = iter(train_runs(runs, todo, d))
        summaries = [s if s is not None else next(done) for s in summaries]
    if d.world > 1:
        if todo:
            dist.barrier()
        dist.destroy_process_group()
    return summaries


def train_runs(runs: list[Run], plans: list[Plan], d: Dist) -> list[dict]:
    """The loop: step k's batches go to every student at step k (one teacher forward for all of them)."""
    first = runs[0]
    # The teacher is checked once, before any output folder is touched, when a student starts from step 0; the
    # check's dev scores are that student's step-0 evaluation.
    checked_by = next((i for i, r in enumerate(runs) if r.teacher is not None and r.step == 0), None)
    checked = {} if checked_by is None else check_teacher(
        first.teacher, runs[checked_by].student.model, first.data, first.tokenizer, runs[checked_by].args,
        first.device, first.autocast)  # every rank decides alike (same data, same masks)
    for plan in plans:
        take_run(plan.claim, plan.request, d)
    start_evals: list[dict] = [{} for _ in runs]
    fresh = [i for i, r in enumerate(runs) if r.dev_set is not None and r.step == 0]
    if checked_by in fresh and d.main:  # the check ran on the dev split: its scores are that student's step 0
        start_evals[checked_by] = checked
    rest = [i for i in fresh if i != checked_by]
    for i, ev in zip(rest, evaluate_runs([runs[i] for i in rest], d)):
        start_evals[i] = ev
    progress = [Progress(run, name=Path(run.args.output_dir).name if len(runs) > 1 else "distill") for run in runs]
    for run, prog, ev in zip(runs, progress, start_evals):
        if ev:
            prog.dev(ev)
        run.student.train()
    last_evals = [{} for _ in runs]
    t0 = time.perf_counter()
    step, end = min(r.step for r in runs), first.args.max_steps
    start, t_first = step, None  # t_first: the end of the first step (worker start-up and pipeline fill)
    batches = iter(step_loader(first.data["train"], first.tokenizer, first.args, d.rank, d.world, step,
                               first.device))
    try:
        while step < end:
            active = [i for i, r in enumerate(runs) if r.step == step]
            host = next(batches)
            for i, (names, total) in zip(active, forward_backward([runs[i] for i in active], host)):
                terms, grad_norm, skipped = update(runs[i], names, total)
                runs[i].step += 1
                progress[i].step(terms, grad_norm, skipped)
            # the students due share one teacher pass over the dev set; their scores go into their checkpoints
            scored = [i for i in active if runs[i].dev_set is not None and due(runs[i], runs[i].args.eval_steps)]
            for i, ev in zip(scored, evaluate_runs([runs[i] for i in scored], d)):
                last_evals[i] = ev
                progress[i].dev(ev)
            for i in active:
                if due(runs[i], runs[i].args.save_steps):
                    checkpoint(runs[i])
            step += 1
            t_first = t_first or time.perf_counter()
    except KeyboardInterrupt:
        for prog in progress:
            prog.bar.close()
        kept = "; ".join(pretraining_kept(r.out) for r in runs)
        raise KeyboardInterrupt(f"training stopped during step {step + 1}; {kept}") from None
    seconds = time.perf_counter() - t0
    # the steady rate: every step after the first (whose time holds DataLoader start-up and the first batch)
    steady = {"steady_steps": step - start - 1, "steady_seconds": time.perf_counter() - t_first} \
        if t_first is not None and step - start > 1 else {}
    summaries = []
    for run, plan, prog, ev0, ev in zip(runs, plans, progress, start_evals, last_evals):
        prog.bar.close()
        args = run.args
        summary = {"steps": run.step, "global_batch": args.batch_size * args.gradient_accumulation_steps * d.world,
                   "world_size": d.world, "matches": plan.matches, "seconds": seconds, "dev_start": ev0,
                   "dev": ev, "history": run.history, "dev_history": run.dev_history, "skipped_steps": run.skipped,
                   "trained_with": [r.args.output_dir for r in runs if r is not run], "args": asdict(args)} | steady
        on_every_rank(d, lambda run=run, summary=summary: write_final(run, summary) if d.main else None,
                      f"writing the final model in {run.out}")
        prog.close()
        summaries.append(summary)
    return summaries
