"""The MLM distillation loop (stage 4): one file, top to bottom, nanoGPT style.

Why a hand-written loop rather than ``accelerate``/``Trainer``: exact resume and
exact 1-vs-N-process equivalence come from deriving *everything random* from
``(seed, step, micro-batch)`` - the data order, the masks, dropout - so a
checkpoint needs only the step, the weights and the optimizer; neither library
exposes that, and the loop is short.

Per optimizer step ``s`` the global batch is the next ``G = batch_size x
gradient_accumulation_steps x world_size`` examples of a seeded permutation of the
dataset (a new permutation each epoch). Rank ``r``, micro-step ``m`` takes the
``(r x A + m)``-th slice of ``batch_size`` examples, so one process with A=2 and
two processes with A=1 see the same examples with the same masks and dropout.

Loss (``minirbt.distill``, shared with fine-tuning) = ``kd_weight`` x soft
cross-entropy(student, teacher; T) at the masked positions + ``mlm_weight`` x
cross-entropy with the true tokens + every intermediate match (``minirbt.matches``). The LM heads run only on the masked
positions (~15% of tokens: the vocabulary projection dominates otherwise). Losses
are computed in fp32; ``--bf16`` autocasts the forward passes (CUDA and CPU).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm
from transformers import BertForMaskedLM

from minirbt import stages
from minirbt.checkpoints import checkpoints, load_checkpoint_state, pretraining_kept, save_checkpoint
from minirbt.collator import ChineseWWMCollator
from minirbt.data import load_pretraining_dataset
from minirbt.distill import DistillConfig, distill_terms, mlm_adaptor, nonfinite_terms
from minirbt.matches import build_projections
from minirbt.mlm_eval import check_teacher, evaluate, masked_lm_forward, teacher_forward, to_device
from minirbt.modeling import load_config, load_mlm, write_model_files
from minirbt.optim import Optimization
from minirbt.pretrain_setup import (
    SUMMARY_NAME,
    Dist,
    DistillArguments,
    check_inputs,
    check_shapes,
    decide_run,
    run_matches,
    setup_distributed,
    take_run,
)
from minirbt.textio import CorpusError
from minirbt.tokenization import load_tokenizer


# ------------------------------------------------------------------ the student side
class Student(nn.Module):
    """Student + match projections: the trained parameters, in one module for DDP."""

    def __init__(self, model: BertForMaskedLM, projections: nn.ModuleList):
        super().__init__()
        self.model = model
        self.projections = projections

    def forward(self, batch: dict, select: torch.Tensor, hidden: bool, attentions: bool):
        return masked_lm_forward(self.model, batch, select, hidden, attentions)


def distill_losses(teacher: BertForMaskedLM | None, student: nn.Module, projections: nn.ModuleList, batch: dict,
                   select: torch.Tensor, config: DistillConfig, autocast) -> dict[str, torch.Tensor]:
    """Every weighted loss term of one micro-batch (fp32). ``student`` may be DDP-wrapped."""
    hidden, attentions = config.needs_hidden, config.needs_attentions
    with autocast:
        out_T = teacher_forward(teacher, batch, select, hidden, attentions)
        out_S = student(batch, select, hidden, attentions)
    adapted_T = mlm_adaptor(out_T, batch, labels=False) if teacher is not None else None
    return distill_terms(config, mlm_adaptor(out_S, batch, labels=bool(config.hard_label_weight)), adapted_T,
                         projections, batch["attention_mask"])


def _sub_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] % (2**63))


class DataOrder:
    """Example index at global position p: a seeded permutation per epoch."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise CorpusError("the training split of the dataset is empty")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for p in range(start, start + count):
            epoch = p // self.n
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out.append(int(self._perm[p % self.n]))
        return out


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

    def evaluate(self) -> dict:
        return evaluate(self.student.model, self.teacher, self.dev_set, self.args.seed + 1, self.tokenizer,
                        self.args, self.device, self.autocast)


def build_run(args: DistillArguments, d: Dist, device: torch.device, config: DistillConfig, resume: bool) -> Run:
    """Models (the teacher frozen), optimizer and schedule, the newest checkpoint when resuming, and the data."""
    attn = config.attn_implementation
    teacher = None
    if args.teacher:
        teacher = load_mlm(args.teacher, "teacher", attn, require_head=True).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    torch.manual_seed(args.seed)  # random student init is the same on every rank
    if args.student_init:
        model = load_mlm(args.student_init, "student", attn)
    else:
        model_config = load_config(args.student_config)
        if attn:
            model_config._attn_implementation = attn
        model = BertForMaskedLM(model_config)
    vocab_dir = args.tokenizer or args.teacher or args.student_init
    student = Student(model, build_projections(config.intermediate_matches)).to(device)
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
    if d.world > 1:
        run.ddp_student = nn.parallel.DistributedDataParallel(
            student, device_ids=[d.local_rank] if device.type == "cuda" else None)
    return run


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
def forward_backward(run: Run, collator: ChineseWWMCollator, order: DataOrder) -> tuple[dict, list[str]]:
    """The step's micro-batches of this rank, forward and backward: (terms averaged over them, non-finite notes)."""
    args, d = run.args, run.d
    A, B = args.gradient_accumulation_steps, args.batch_size
    global_batch = B * A * d.world
    terms_step: dict[str, float] = {}
    bad: list[str] = []
    for m in range(A):
        g = d.rank * A + m  # global micro-batch index within the step
        idx = order.indices(run.step * global_batch + g * B, B)
        collator.rng = np.random.default_rng([args.seed, run.step, g])
        batch = to_device(collator([run.data["train"][i] for i in idx]), run.device)
        select = batch["labels"] != -100
        torch.manual_seed(_sub_seed(args.seed, run.step, g))  # dropout: same on any number of processes
        sync = m == A - 1 or d.world == 1
        with run.ddp_student.no_sync() if not sync else nullcontext():
            terms = distill_losses(run.teacher, run.ddp_student, run.student.projections, batch, select, run.config,
                                   run.autocast)
            bad += nonfinite_terms(terms)
            if bad and args.on_nonfinite == "stop":
                raise CorpusError(f"non-finite loss at step {run.step + 1}: {bad[0]}; nothing saved for this step; "
                                  f"{pretraining_kept(run.out)} (--on_nonfinite skip skips such steps)")
            (sum(terms.values()) / A).backward()  # even when skipping: every DDP rank must run the same collectives
        for name, value in terms.items():
            terms_step[name] = terms_step.get(name, 0.0) + value.item() / A
    return terms_step, bad


def update(run: Run, bad: list[str]) -> tuple[torch.Tensor, bool]:
    """Clip, then apply the step, or skip it (--on_nonfinite skip) when any rank saw a NaN/inf; the schedule
    advances either way. Returns (gradient norm, skipped)."""
    args, d = run.args, run.d
    grad_norm = run.optimization.clip()
    if not torch.isfinite(grad_norm):
        bad.append(f"gradient norm = {grad_norm.item()}")
    skip = bool(bad)
    if d.world > 1:  # every rank takes the same decision
        flag = torch.tensor([float(skip)], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        skip = bool(flag.item())
    where = bad[0] if bad else "non-finite on another rank"
    if skip and args.on_nonfinite == "stop":
        raise CorpusError(f"non-finite values at step {run.step + 1}: {bad[0] if bad else 'on another rank'}; the "
                          f"weights were not updated; {pretraining_kept(run.out)}")
    if skip:
        run.skipped.append(run.step + 1)
        if d.main:
            tqdm.write(f"step {run.step + 1}: skipped ({where}); {len(run.skipped)} skipped so far")
        if len(run.skipped) > args.max_skipped_steps:
            raise CorpusError(f"{len(run.skipped)} steps had non-finite losses or gradients (first: "
                              f"{run.skipped[:5]}), more than --max_skipped_steps {args.max_skipped_steps}: "
                              f"stopping; {pretraining_kept(run.out)}")
    run.optimization.step(update=not skip)
    return grad_norm, skip


# ------------------------------------------------------------------ logging, evaluation, checkpoints
class Progress:
    """The progress bar and TensorBoard (rank 0 only): train terms averaged over --logging_steps, dev scores."""

    def __init__(self, run: Run):
        self.run, self.main = run, run.d.main
        self.writer = None
        if self.main:
            run.out.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.out / "runs"))
        self.bar = tqdm(total=run.args.max_steps, initial=run.step, desc="distill", disable=not self.main,
                        dynamic_ncols=True)
        self.sums: dict[str, float] = {}
        self.count = 0

    def step(self, terms: dict[str, float], grad_norm: torch.Tensor, skipped: bool) -> None:
        run, step = self.run, self.run.step
        if not skipped:
            for name, value in terms.items():
                self.sums[name] = self.sums.get(name, 0.0) + value
            self.count += 1
        if not self.main:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{sum(terms.values()):.4f}", lr=f"{run.optimization.lr:.2e}")
        if self.count and (step % run.args.logging_steps == 0 or step == run.args.max_steps):
            run.history.append({"step": step, **{k: v / self.count for k, v in self.sums.items()}})
            for name, value in self.sums.items():
                self.writer.add_scalar(f"train/{name}", value / self.count, step)
            self.writer.add_scalar("train/loss", sum(self.sums.values()) / self.count, step)
            self.writer.add_scalar("train/lr", run.optimization.lr, step)
            self.writer.add_scalar("train/grad_norm", float(grad_norm), step)
            self.sums, self.count = {}, 0

    def dev(self, scores: dict) -> None:
        step = self.run.step
        self.run.dev_history.append({"step": step, **scores})
        for name, value in scores.items():
            self.writer.add_scalar(f"dev/{name}", value, step)
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def due(run: Run, every: int) -> bool:
    return run.step % every == 0 or run.step == run.args.max_steps


def checkpoint(run: Run) -> None:
    """Rank 0 writes the checkpoint (atomically); every rank waits for it."""
    if run.d.main:
        try:
            save_checkpoint(run.out, run.step, run.student.model, run.student.projections, run.optimization,
                            run.vocab_file, run.args, run.args.save_total_limit, run.logs())
        except OSError as e:  # full disk, quota, permissions: the temp dir is gone, older ones intact
            found = checkpoints(run.out)
            kept = f"the newest complete checkpoint is {found[-1]}" if found else "no earlier checkpoint"
            raise CorpusError(f"could not write the checkpoint of step {run.step} in {run.out}: {e}; {kept} "
                              f"(untouched). Free space and re-run with --resume.") from None
    if run.d.world > 1:
        dist.barrier()


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
    check_inputs(args)
    matches = run_matches(args)
    check_shapes(args, matches)
    d, device = setup_distributed(args.device)
    claim, request = decide_run(args, d, matches)
    if claim.state == "done":
        summary_file = Path(args.output_dir) / SUMMARY_NAME
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if d.world > 1:  # every rank decided alike from the same record
            dist.destroy_process_group()
        return {"steps": args.max_steps, "seconds": 0.0, "dev": {}} | summary | {"skipped": True}
    run = build_run(args, d, device, args.distill_config(matches), claim.state == "resume")
    collator = ChineseWWMCollator(run.tokenizer, args.mlm_probability, seed=args.seed)
    order = DataOrder(len(run.data["train"]), args.seed)
    checked: dict = {}
    if run.teacher is not None and run.step == 0:  # every rank decides alike (same data, same masks)
        checked = check_teacher(run.teacher, run.student.model, run.data, run.tokenizer, args, device, run.autocast)
    take_run(claim, request, d)

    progress = Progress(run)
    first_eval: dict = {}
    last_eval: dict = {}
    if run.dev_set is not None and d.main and run.step == 0:
        first_eval = checked or run.evaluate()  # the teacher check already measured the dev split
        progress.dev(first_eval)
    t0 = time.perf_counter()
    run.student.train()
    try:
        while run.step < args.max_steps:
            terms, bad = forward_backward(run, collator, order)
            grad_norm, skipped = update(run, bad)
            run.step += 1
            progress.step(terms, grad_norm, skipped)
            if run.dev_set is not None and due(run, args.eval_steps) and d.main:
                last_eval = run.evaluate()
                progress.dev(last_eval)
            if due(run, args.save_steps):
                checkpoint(run)
    except KeyboardInterrupt:
        progress.bar.close()
        raise KeyboardInterrupt(f"training stopped during step {run.step + 1}; {pretraining_kept(run.out)}") from None
    progress.bar.close()
    summary = {"steps": run.step, "global_batch": args.batch_size * args.gradient_accumulation_steps * d.world,
               "world_size": d.world, "matches": matches, "seconds": time.perf_counter() - t0,
               "dev_start": first_eval, "dev": last_eval, "history": run.history, "dev_history": run.dev_history,
               "skipped_steps": run.skipped, "args": asdict(args)}
    if d.main:
        write_final(run, summary)
    progress.close()
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
