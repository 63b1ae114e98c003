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
import math
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
from minirbt.checkpoints import checkpoint_step, checkpoints, load_checkpoint_state, pretraining_kept, save_checkpoint
from minirbt.cli import check_device
from minirbt.collator import ChineseWWMCollator
from minirbt.data import load_pretraining_dataset
from minirbt.distill import DistillConfig, distill_terms, mlm_adaptor, nonfinite_values, term_values
from minirbt.matches import build_projections, encoder_layers, student_features
from minirbt.mlm_eval import check_teacher, evaluate, host_batch, masked_lm_forward, teacher_forward, to_device
from minirbt.modeling import load_config, load_mlm, write_model_files
from minirbt.optim import Optimization
from minirbt.pretrain_setup import (
    SUMMARY_NAME,
    Dist,
    DistillArguments,
    agree,
    check_inputs,
    check_shapes,
    decide_run,
    on_every_rank,
    request_digest,
    run_matches,
    setup_distributed,
    take_run,
)
from minirbt.textio import CorpusError
from minirbt.tokenization import load_tokenizer
from minirbt.train_progress import Progress


# ------------------------------------------------------------------ the student side
class Student(nn.Module):
    """Student + match projections: the trained parameters, in one module for DDP, and a forward that runs all of
    them (DDP's reducer expects every trained parameter to be used inside forward, the projections included)."""

    def __init__(self, model: BertForMaskedLM, projections: nn.ModuleList, config: DistillConfig):
        super().__init__()
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


def distill_losses(teacher: BertForMaskedLM | None, student: nn.Module, batch: dict, config: DistillConfig,
                   autocast) -> dict[str, torch.Tensor]:
    """Every weighted loss term of one micro-batch (fp32). ``student``: a :class:`Student`, maybe DDP-wrapped."""
    hidden, attentions = config.needs_hidden, config.needs_attentions
    with autocast:
        out_T = teacher_forward(teacher, batch, hidden, attentions, logits=bool(config.kd_loss_weight))
        logits, hs, att, features = student(batch, hidden, attentions)
    adapted_T = mlm_adaptor(out_T, batch, labels=False) | {"layers": encoder_layers(teacher)} \
        if teacher is not None else None
    adapted_S = mlm_adaptor((logits, hs, att), batch, labels=bool(config.hard_label_weight))
    return distill_terms(config, adapted_S | {"features": features}, adapted_T, None, batch["attention_mask"])


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
        if args.bf16:  # frozen: cast once, not by autocast at every forward (its matmuls see the same bf16 weights)
            teacher = teacher.to(torch.bfloat16)
    torch.manual_seed(args.seed)  # random student init is the same on every rank
    if args.student_init:
        model = load_mlm(args.student_init, "student", attn)
    else:
        model_config = load_config(args.student_config)
        if attn:
            model_config._attn_implementation = attn
        model = BertForMaskedLM(model_config)
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
    if d.world > 1:
        # The buffers (position ids) never change: no broadcast each forward. Gradients live in DDP's buckets.
        run.ddp_student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            gradient_as_bucket_view=True)
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


# ------------------------------------------------------------------ the input pipeline
class StepBatches(torch.utils.data.Dataset):
    """Item k: this rank's micro-batches of step k, collated on the host. Examples and masks come from (seed, step,
    global micro-batch index) alone, so any number of processes sees the same global batch, a resumed run the same
    batches, and DataLoader workers can prepare steps ahead in any process."""

    def __init__(self, train, tokenizer, args: DistillArguments, rank: int, world: int):
        self.train, self.tokenizer, self.args, self.rank, self.world = train, tokenizer, args, rank, world
        self.collator: ChineseWWMCollator | None = None  # made in the process that uses it (a worker)
        self.order: DataOrder | None = None

    def __len__(self) -> int:
        return self.args.max_steps

    def __getitem__(self, step: int) -> list[dict]:
        args = self.args
        if self.collator is None:
            self.collator = ChineseWWMCollator(self.tokenizer, args.mlm_probability, seed=args.seed)
            self.order = DataOrder(len(self.train), args.seed)
        A, B = args.gradient_accumulation_steps, args.batch_size
        global_batch = B * A * self.world
        batches = []
        for m in range(A):
            g = self.rank * A + m  # global micro-batch index within the step
            idx = self.order.indices(step * global_batch + g * B, B)
            columns = self.train[idx]  # one Arrow read for the micro-batch, not one per example
            examples = [dict(zip(columns, values)) for values in zip(*columns.values())]
            self.collator.rng = np.random.default_rng([args.seed, step, g])
            batches.append(host_batch(self.collator, examples))
        return batches


def step_loader(run: Run) -> torch.utils.data.DataLoader:
    """Steps run.step .. max_steps - 1 in order, prepared by ``--dataloader_workers`` processes ahead of the loop
    (pinned for CUDA copies); the training process only waits when the workers fall behind."""
    args = run.args
    workers = args.dataloader_workers
    steps = StepBatches(run.data["train"], run.tokenizer, args, run.d.rank, run.d.world)
    return torch.utils.data.DataLoader(steps, batch_size=None, sampler=range(run.step, args.max_steps),
                                       num_workers=workers, pin_memory=run.device.type == "cuda",
                                       prefetch_factor=2 if workers else None, persistent_workers=False)


# ------------------------------------------------------------------ one optimizer step


def forward_backward(run: Run, batches: list[dict]) -> tuple[list[str], torch.Tensor]:
    """Forward and backward of the step's micro-batches: (term names, their values averaged over the micro-batches
    as one vector on the device). Nothing here waits for the device; :func:`update` reads the vector once."""
    args, d = run.args, run.d
    A = len(batches)
    total, names = None, []
    for m, host in enumerate(batches):
        batch = to_device(host, run.device)
        torch.manual_seed(_sub_seed(args.seed, run.step, d.rank * A + m))  # dropout: same on any number of ranks
        sync = m == A - 1 or d.world == 1
        with run.ddp_student.no_sync() if not sync else nullcontext():
            terms = distill_losses(run.teacher, run.ddp_student, batch, run.config, run.autocast)
            # even when a term is NaN: every DDP rank runs the same collectives; update() decides
            (sum(terms.values()) / A).backward()
        values = term_values(terms) / A
        total, names = (values if total is None else total + values), list(terms)
    return names, total


def update(run: Run, names: list[str], total: torch.Tensor) -> tuple[dict[str, float], float, bool]:
    """Clip, then apply the step, or skip it (--on_nonfinite skip) or stop (stop) when any rank saw a NaN/inf;
    every rank decides after the same all-reduce. The schedule advances either way. The step's one read-back
    from the device is here. Returns (terms, gradient norm, skipped)."""
    args, d = run.args, run.d
    grad_norm = run.optimization.clip()
    stats = torch.cat([total, grad_norm.detach().float().reshape(1).to(total.device)])
    flag = (~torch.isfinite(stats)).any().float().reshape(1)
    if d.world > 1:  # every rank takes the same decision
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    *values, norm, any_bad = torch.cat([stats, flag]).tolist()
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
    check_device(args.device)
    d, device = setup_distributed(args.device)  # first: a check that fails on one node must stop every node

    def setup() -> tuple:
        check_inputs(args)
        matches = run_matches(args)
        check_shapes(args, matches)
        return (matches, *decide_run(args, d, matches))

    matches, claim, request = on_every_rank(d, setup, "checking the run's inputs and output folder")
    found = checkpoints(Path(args.output_dir)) if claim.state == "resume" else []
    agree(d, {"output_dir": claim.state, "resume_from_step": checkpoint_step(found[-1]) if found else 0,
              "settings_and_inputs": request_digest(request)}, "the run")
    if claim.state == "done":
        summary_file = Path(args.output_dir) / SUMMARY_NAME
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if d.world > 1:  # every rank decided alike from the same record
            dist.destroy_process_group()
        return {"steps": args.max_steps, "seconds": 0.0, "dev": {}} | summary | {"skipped": True}
    run = on_every_rank(d, lambda: build_run(args, d, device, args.distill_config(matches), claim.state == "resume"),
                        "loading the models and the dataset")
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
    batches = iter(step_loader(run))
    try:
        while run.step < args.max_steps:
            names, total = forward_backward(run, next(batches))
            terms, grad_norm, skipped = update(run, names, total)
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
