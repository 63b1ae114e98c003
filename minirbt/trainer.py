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

Loss = ``kd_weight`` x soft cross-entropy(student, teacher; T) at the masked
positions + ``mlm_weight`` x cross-entropy with the true tokens + every
intermediate match (``minirbt.matches``). The LM heads run only on the masked
positions (~15% of tokens: the vocabulary projection dominates otherwise). Losses
are computed in fp32; ``--bf16`` autocasts the forward passes (CUDA and CPU).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import BertForMaskedLM, get_linear_schedule_with_warmup

from minirbt import stages
from minirbt.cli import OVERWRITE_HELP, check_device, check_ranges
from minirbt.collator import ChineseWWMCollator
from minirbt.data import MANIFEST, dataset_fingerprint, load_pretraining_dataset
from minirbt.faults import fault_point
from minirbt.matches import (
    KD_LOSSES,
    build_projections,
    check_matches,
    match_losses,
    needs_attentions,
    resolve_matches,
)
from minirbt.modeling import check_model_folder, load_config, load_mlm, resolve_model, write_model_files
from minirbt.optim import build_optimizer, parameter_groups
from minirbt.textio import CorpusError, atomic_path
from minirbt.tokenization import load_tokenizer, vocab_fingerprint

STATE_NAME = "training_state.pt"
SUMMARY_NAME = stages.TRAINING_SUMMARY
# What a training run writes into its output_dir (removed when --overwrite_output replaces the run).
RUN_FILES = ("checkpoint-*", ".checkpoint-*", ".final-*", "runs", SUMMARY_NAME, "config.json", "model.safetensors",
             "vocab.txt", "tokenizer_config.json")


# Settings of a training run that --accept_changed may let a resumed run continue under.
RESUME_CHANGEABLE = ("max_steps",)
# Settings that do not change the trained weights: never part of the run's record.
NOT_RECORDED = ("dataset", "output_dir", "teacher", "tokenizer", "student_init", "student_config", "save_steps",
                "save_total_limit", "eval_steps", "eval_batches", "logging_steps", "on_nonfinite",
                "min_teacher_accuracy", "max_skipped_steps", "resume", "device", "overwrite_output", "accept_changed",
                "gradient_accumulation_steps")


@dataclass
class DistillArguments:
    dataset: str = field(metadata={"help": "Dataset folder from pretraining/my_datasets.py."})
    output_dir: str = field(metadata={"help": "Where the student, checkpoints and TensorBoard logs go."})
    teacher: str | None = field(default=None, metadata={
        "help": "Teacher: a model folder (a stage-1 output works as-is) or a Hugging Face model id such as "
                "hfl/chinese-roberta-wwm-ext. Without it: plain MLM pretraining."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "Vocab folder (default: the teacher's, else --student_init's)."})
    student_config: str | None = field(default=None, metadata={
        "help": "Student config: a JSON file or a shipped name (rbt6, minirbt_h256, ...); random init."})
    student_init: str | None = field(default=None, metadata={
        "help": "Student model folder (e.g. from scripts/init_checkpoint_TA.py) or model id to start from."})
    matches: list[str] = field(default_factory=list, metadata={
        "nargs": "*", "help": "Intermediate matches: preset names, JSON files or JSON lists."})
    temperature: float = field(default=8.0, metadata={"help": "Softmax temperature of the KD loss."})
    kd_loss: str = field(default="ce", metadata={"help": "KD loss: ce (soft cross-entropy) or mse."})
    kd_weight: float | None = field(default=None, metadata={
        "help": "Weight of the KD loss (default 1 with a teacher, 0 without)."})
    mlm_weight: float | None = field(default=None, metadata={
        "help": "Weight of the hard-label MLM loss (default 0 with a teacher, 1 without)."})
    max_steps: int = field(default=100_000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Sequences per micro-batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=4e-4, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.01, metadata={
        "help": "AdamW weight decay (not on biases, LayerNorm or match projections)."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon (MiniRBT: 1e-6)."})
    adam_bias_correction: bool = field(default=False, metadata={
        "help": "Bias-corrected Adam moments (PyTorch's AdamW). Default off: MiniRBT's transformers-4 "
                "AdamW(correct_bias=False), see minirbt/optim.py."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Linear warm-up share of max_steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens chosen for prediction."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for forward passes (losses in fp32)."})
    save_steps: int = field(default=1000, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int = field(default=3, metadata={"help": "Checkpoints kept (the newest)."})
    eval_steps: int = field(default=1000, metadata={"help": "Dev evaluation every N steps (0: never)."})
    eval_batches: int = field(default=50, metadata={"help": "Dev batches per evaluation."})
    min_teacher_accuracy: float = field(default=0.01, metadata={
        "help": "Before step 1 the teacher's masked-token accuracy on the dev split is measured and printed; "
                "below this floor (chance is ~0.005%; an untrained MLM head scores about that) the run is "
                "refused. 0: distil anyway."})
    logging_steps: int = field(default=50, metadata={"help": "TensorBoard scalars every N steps."})
    on_nonfinite: str = field(default="stop", metadata={
        "help": "A NaN/inf loss or gradient: 'stop' (default; the last checkpoint is kept) or 'skip' the step."})
    max_skipped_steps: int = field(default=100, metadata={"help": "With --on_nonfinite skip: give up after N."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint in output_dir."})
    seed: int = field(default=42, metadata={"help": "Seed of data order, masks, dropout and init."})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)."})
    overwrite_output: bool = field(default=False, metadata={"help": OVERWRITE_HELP})
    accept_changed: list[str] = field(default_factory=list, metadata={
        "nargs": "*", "help": f"With --resume: settings allowed to differ from the run's record "
                              f"({', '.join(RESUME_CHANGEABLE)}; e.g. to continue a run to more steps)."})

    def __post_init__(self):
        check_ranges(self, at_least_1=("max_steps", "batch_size", "gradient_accumulation_steps", "save_steps",
                                       "eval_batches", "logging_steps"),
                     non_negative=("kd_weight", "mlm_weight", "weight_decay", "eval_steps", "save_total_limit",
                                   "max_skipped_steps", "seed"),
                     positive=("temperature", "learning_rate", "max_grad_norm", "adam_epsilon"),
                     probability=("mlm_probability",), fraction=("warmup_ratio", "min_teacher_accuracy"))




# ------------------------------------------------------------------ distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; plain python runs one process."""
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
             int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
        dev = torch.device("cuda", d.local_rank)
    else:
        dev = torch.device("cpu")
    if d.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return d, dev


# ------------------------------------------------------------------ the student side
class Student(nn.Module):
    """Student + match projections: the trained parameters, in one module for DDP."""

    def __init__(self, model: BertForMaskedLM, projections: nn.ModuleList):
        super().__init__()
        self.model = model
        self.projections = projections

    def forward(self, batch: dict, select: torch.Tensor, hidden: bool, attentions: bool):
        return masked_lm_forward(self.model, batch, select, hidden, attentions)


def masked_lm_forward(model: BertForMaskedLM, batch: dict, select: torch.Tensor, hidden: bool, attentions: bool):
    """Encoder outputs, and MLM logits at the selected (masked) positions only."""
    out = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"], output_hidden_states=hidden,
                     output_attentions=attentions)
    return model.cls(out.last_hidden_state[select]), out.hidden_states, out.attentions


def teacher_forward(teacher: BertForMaskedLM | None, batch: dict, select: torch.Tensor, hidden: bool,
                    attentions: bool):
    if teacher is None:  # MLM pretraining without a teacher
        return None, None, None
    with torch.no_grad():
        return masked_lm_forward(teacher, batch, select, hidden, attentions)


def distill_losses(teacher: BertForMaskedLM | None, student: nn.Module, projections: nn.ModuleList, batch: dict,
                   select: torch.Tensor, matches: list[dict], args: DistillArguments, autocast,
                   need_hidden: bool, need_att: bool) -> dict[str, torch.Tensor]:
    """Every weighted loss term of one micro-batch (fp32). ``student`` may be DDP-wrapped."""
    with autocast:
        logits_T, hid_T, att_T = teacher_forward(teacher, batch, select, need_hidden, need_att)
        logits_S, hid_S, att_S = student(batch, select, need_hidden, need_att)
    terms = {}
    ls = logits_S.float()
    lt = logits_T.float() if logits_T is not None else None
    if args.kd_weight:
        terms["kd"] = args.kd_weight * KD_LOSSES[args.kd_loss](ls, lt, args.temperature)
    if args.mlm_weight:
        terms["mlm"] = args.mlm_weight * F.cross_entropy(ls, batch["labels"][select])
    for i, loss in enumerate(match_losses(matches, projections, hid_S, hid_T, att_S, att_T, batch["attention_mask"])):
        terms[f"match{i}_{matches[i]['loss']}"] = loss
    return terms


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


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------ checkpoints
def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (written atomically: a half-written one is a hidden temp dir)."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and (p / STATE_NAME).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    """The step of a ``checkpoint-NNNNNNN`` folder, from its name."""
    return int(folder.name.split("-")[1])


def save_checkpoint(output_dir: Path, step: int, student: Student, optimizer, scheduler, vocab_file: Path,
                    args: DistillArguments, limit: int, logs: dict | None = None) -> Path:
    final = output_dir / f"checkpoint-{step:07d}"
    with atomic_path(final, is_dir=True, replace=True) as tmp:
        write_model_files(student.model, vocab_file, tmp)
        fault_point("checkpoint.model")
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "projections": student.projections.state_dict(), "args": asdict(args),
                    "logs": logs or {}}, tmp / STATE_NAME)
        fault_point("checkpoint.state")
    for old in checkpoints(output_dir)[:-limit] if limit > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _kept(out: Path) -> str:
    """What a stopped run leaves behind, truthfully."""
    found = checkpoints(out)
    if not found:
        return f"no checkpoint was written yet in {out}: a re-run starts from step 0"
    step = checkpoint_step(found[-1])
    return f"the newest checkpoint, {found[-1]} (step {step}), is kept: re-run with --resume to continue from it"


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(student: BertForMaskedLM, teacher: BertForMaskedLM | None, dev, collator_seed: int, tokenizer,
             args: DistillArguments, device: torch.device, autocast) -> dict:
    """Masked-token accuracy and perplexity of student (and teacher, and the KD loss) on fixed dev masks."""
    collator = ChineseWWMCollator(tokenizer, args.mlm_probability, seed=collator_seed)
    student.eval()
    totals = {"n": 0, "student_nll": 0.0, "teacher_nll": 0.0, "student_correct": 0, "teacher_correct": 0,
              "kd": 0.0, "agree": 0}
    n_batches = min(args.eval_batches, math.ceil(len(dev) / args.batch_size))
    for b in range(n_batches):
        rows = dev[b * args.batch_size : (b + 1) * args.batch_size]
        batch = _to(collator([dict(zip(rows, v)) for v in zip(*rows.values())]), device)
        select = batch["labels"] != -100
        labels = batch["labels"][select]
        with autocast:
            ls, _, _ = masked_lm_forward(student, batch, select, False, False)
            lt, _, _ = teacher_forward(teacher, batch, select, False, False)
        ls = ls.float()
        totals["n"] += labels.numel()
        totals["student_nll"] += F.cross_entropy(ls, labels, reduction="sum").item()
        totals["student_correct"] += (ls.argmax(-1) == labels).sum().item()
        if lt is not None:
            lt = lt.float()
            totals["teacher_nll"] += F.cross_entropy(lt, labels, reduction="sum").item()
            totals["teacher_correct"] += (lt.argmax(-1) == labels).sum().item()
            totals["agree"] += (ls.argmax(-1) == lt.argmax(-1)).sum().item()
            totals["kd"] += KD_LOSSES[args.kd_loss](ls, lt, args.temperature).item() * labels.numel()
    student.train()
    n = max(totals["n"], 1)
    result = {
        "student_mlm_accuracy": totals["student_correct"] / n,
        "student_mlm_loss": totals["student_nll"] / n,
        "student_perplexity": math.exp(min(totals["student_nll"] / n, 50)),
    }
    if teacher is not None:
        result |= {
            "teacher_mlm_accuracy": totals["teacher_correct"] / n,
            "teacher_perplexity": math.exp(min(totals["teacher_nll"] / n, 50)),
            "top1_agreement": totals["agree"] / n,
            "kd_loss": totals["kd"] / n,
        }
    return result | {"tokens": totals["n"]}


# ------------------------------------------------------------------ setup checks
def _check_inputs(args: DistillArguments) -> None:
    for name in ("teacher", "student_init", "tokenizer"):  # local folders or Hugging Face model ids
        setattr(args, name, resolve_model(getattr(args, name), f"--{name}"))
    if (args.student_config is None) == (args.student_init is None):
        raise CorpusError("give exactly one of --student_config (random init) or --student_init (a model folder)")
    if args.teacher is None:
        if args.kd_weight or args.matches:
            raise CorpusError("--kd_weight and --matches need a --teacher")
        if args.mlm_weight == 0:
            raise CorpusError("without --teacher the only loss is MLM: --mlm_weight must be positive")
        if args.tokenizer is None and args.student_init is None:
            raise CorpusError("without --teacher, give --tokenizer (a folder with vocab.txt) for the student")
        args.kd_weight, args.mlm_weight = 0.0, 1.0 if args.mlm_weight is None else args.mlm_weight
    else:
        args.kd_weight = 1.0 if args.kd_weight is None else args.kd_weight
        args.mlm_weight = 0.0 if args.mlm_weight is None else args.mlm_weight
        check_model_folder(args.teacher, "teacher")
    if args.kd_weight == 0 and args.mlm_weight == 0 and not args.matches:
        raise CorpusError("every loss weight is 0: set --kd_weight, --mlm_weight or --matches")
    if args.kd_loss not in KD_LOSSES:
        raise CorpusError(f"--kd_loss must be one of {', '.join(KD_LOSSES)}")
    check_device(args.device)
    if args.on_nonfinite not in ("stop", "skip"):
        raise CorpusError(f"--on_nonfinite must be stop or skip, not {args.on_nonfinite!r}")
    if not (Path(args.dataset) / MANIFEST).is_file():
        raise CorpusError(f"--dataset {args.dataset} is not a dataset made by pretraining/my_datasets.py")
    if args.student_init:
        check_model_folder(args.student_init, "--student_init")
    if args.tokenizer is not None and not (Path(args.tokenizer) / "vocab.txt").is_file():
        raise CorpusError(f"--tokenizer {args.tokenizer} has no vocab.txt")


def run_request(args: DistillArguments, world: int, matches: list[dict]) -> dict:
    """The settings and input contents that determine a training run's weights (its record, minirbt.stages)."""
    settings = {k: v for k, v in asdict(args).items() if k not in NOT_RECORDED}
    settings["micro_batches_per_step"] = args.gradient_accumulation_steps * world  # 1 x A=2 equals 2 x A=1
    settings["matches"] = matches
    settings["student_config"] = load_config(args.student_config).to_diff_dict() if args.student_config else None
    settings["vocab"] = stages.file_fingerprint(Path(args.tokenizer or args.teacher or args.student_init)
                                                / "vocab.txt")
    inputs = {"dataset": stages.input_entry(args.dataset, dataset_fingerprint(args.dataset))}
    for name in ("teacher", "student_init"):
        folder = getattr(args, name)
        if folder:
            inputs[name] = stages.input_entry(folder, stages.model_fingerprint(folder))
    return {"settings": settings, "inputs": inputs}


def decide_run(args: DistillArguments, d: Dist, matches: list[dict]) -> tuple[stages.Claim, dict]:
    """What this run may do with output_dir (minirbt.stages): refuses inputs, foreign folders and other settings.
    Writes nothing (see :func:`take_run`), so a request refused later leaves the folder as it was."""
    request = run_request(args, d.world, matches)
    inputs = [("--teacher", args.teacher), ("--student_init", args.student_init), ("--dataset", args.dataset),
              ("--tokenizer", args.tokenizer)]
    if args.student_config and Path(args.student_config).is_file():
        inputs.append(("--student_config", args.student_config))
    claim = stages.claim(stages.TRAINING_RUN, args.output_dir, request, inputs=inputs,
                         overwrite=args.overwrite_output, resume=args.resume, accept_changed=args.accept_changed,
                         acceptable=RESUME_CHANGEABLE, has_progress=lambda p: bool(checkpoints(p)))
    found = checkpoints(Path(args.output_dir)) if claim.state == "resume" else []
    if found and checkpoint_step(found[-1]) > args.max_steps:
        raise CorpusError(f"--max_steps {args.max_steps} is below the step of the newest checkpoint, {found[-1]} "
                          f"(step {checkpoint_step(found[-1])}): nothing to do; give a larger --max_steps")
    return claim, request


def take_run(claim: stages.Claim, request: dict, d: Dist) -> None:
    """On rank 0: remove a replaced run's files and record this request (incomplete until the final write)."""
    if d.main:
        out = claim.path
        if claim.state == "replace":
            stages.clear_output(stages.TRAINING_RUN, out, RUN_FILES)
        out.mkdir(parents=True, exist_ok=True)
        changed = [{"setting": n, "old": a, "new": b} for n, a, b in claim.accepted]
        history = (claim.record or {}).get("changed_on_resume", []) + changed if claim.state == "resume" else []
        stages.write_record(stages.TRAINING_RUN, out, request, complete=False, changed_on_resume=history)
    if d.world > 1:
        dist.barrier()  # the record exists before any rank goes on


def check_teacher(teacher: BertForMaskedLM, student: BertForMaskedLM, data, tokenizer, args: DistillArguments,
                  device: torch.device, autocast) -> dict:
    """Before step 1: the teacher's masked-token accuracy on held-out text (the train split when there is no dev
    split), printed, and refused below --min_teacher_accuracy: a teacher whose MLM head is untrained teaches
    noise for days."""
    split = "validation" if data.get("validation") is not None and len(data["validation"]) else "train"
    result = evaluate(student, teacher, data[split], args.seed + 1, tokenizer, args, device, autocast)
    acc = result["teacher_mlm_accuracy"]
    tqdm.write(f"teacher check: masked-token accuracy {100 * acc:.2f}% on {result['tokens']} {split} tokens "
               f"(floor --min_teacher_accuracy {100 * args.min_teacher_accuracy:g}%; chance "
               f"{100 / teacher.config.vocab_size:.3f}%)")
    if acc < args.min_teacher_accuracy:
        raise CorpusError(f"the teacher {args.teacher} predicts only {100 * acc:.2f}% of masked tokens on the "
                          f"{split} split, below --min_teacher_accuracy {args.min_teacher_accuracy:g}: is its MLM "
                          f"head trained, and its vocab the dataset's? Pass --min_teacher_accuracy 0 to distil "
                          f"from it anyway")
    return result


def _vocab_check(tokenizer, vocab_dir: str, dataset_dir: str, student_vocab: int, teacher_vocab: int | None) -> None:
    record = stages.read_record(stages.DATASET, dataset_dir)
    if record is None:
        raise CorpusError(f"--dataset {dataset_dir} is not a dataset made by pretraining/my_datasets.py")
    if record["settings"]["vocab"] != vocab_fingerprint(tokenizer):
        raise CorpusError(f"vocab mismatch: the dataset {dataset_dir} was tokenized with another vocab than "
                          f"{vocab_dir}/vocab.txt; rebuild it with --tokenizer {vocab_dir}")
    if student_vocab < len(tokenizer):
        raise CorpusError(f"vocab mismatch: the student has vocab_size {student_vocab}, {vocab_dir}/vocab.txt "
                          f"has {len(tokenizer)} tokens")
    if teacher_vocab is not None and student_vocab != teacher_vocab:
        raise CorpusError(f"vocab mismatch: the student has vocab_size {student_vocab}, the teacher {teacher_vocab}")


# ------------------------------------------------------------------ the loop
def _check_shapes(args: DistillArguments, matches: list[dict]) -> None:
    """Everything that the configs and the vocab decide, before the run claims its output."""
    teacher_conf = load_config(Path(args.teacher) / "config.json") if args.teacher else None
    student_conf = load_config(Path(args.student_init) / "config.json" if args.student_init else args.student_config)
    vocab_dir = args.tokenizer or args.teacher or args.student_init
    _vocab_check(load_tokenizer(vocab_dir), vocab_dir, args.dataset, student_conf.vocab_size,
                 teacher_conf.vocab_size if teacher_conf is not None else None)
    if teacher_conf is not None:
        check_matches(matches, teacher_conf.num_hidden_layers, student_conf.num_hidden_layers,
                      teacher_conf.hidden_size, student_conf.hidden_size,
                      teacher_conf.num_attention_heads, student_conf.num_attention_heads)
    length = stages.read_record(stages.DATASET, args.dataset)["settings"]["max_seq_length"]
    for what, conf in (("--teacher", teacher_conf), ("student", student_conf)):
        if conf is not None and length > conf.max_position_embeddings:
            raise CorpusError(f"the dataset {args.dataset} has sequences of {length} tokens, longer than the "
                              f"{what}'s max_position_embeddings {conf.max_position_embeddings}")


def train(args: DistillArguments) -> dict:
    _check_inputs(args)
    matches = resolve_matches(args.matches)
    _check_shapes(args, matches)
    d, device = setup_distributed(args.device)
    out = Path(args.output_dir)
    claim, request = decide_run(args, d, matches)
    if claim.state == "done":
        summary = json.loads((out / SUMMARY_NAME).read_text()) if (out / SUMMARY_NAME).is_file() else {}
        if d.world > 1:  # every rank decided alike from the same record
            dist.destroy_process_group()
        return {"steps": args.max_steps, "seconds": 0.0, "dev": {}} | summary | {"skipped": True}
    attn = "eager" if needs_attentions(matches) else None  # SDPA returns no attention probabilities
    teacher = None
    if args.teacher:
        teacher = load_mlm(args.teacher, "teacher", attn, require_head=True).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    torch.manual_seed(args.seed)  # random student init is the same on every rank
    if args.student_init:
        model = load_mlm(args.student_init, "student", attn)
    else:
        config = load_config(args.student_config)
        if attn:
            config._attn_implementation = attn
        model = BertForMaskedLM(config)
    vocab_dir = args.tokenizer or args.teacher or args.student_init
    tokenizer = load_tokenizer(vocab_dir)
    student = Student(model, build_projections(matches)).to(device)

    optimizer = build_optimizer(parameter_groups(student.model, student.projections, args.weight_decay),
                                args.learning_rate, args.adam_epsilon, args.adam_bias_correction)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * args.max_steps), args.max_steps)

    step = 0
    logs: dict = {}
    if claim.state == "resume":
        found = checkpoints(out)
        if found:
            ckpt = found[-1]
            state = torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=True)
            resumed = load_mlm(ckpt, "checkpoint", attn)
            student.model.load_state_dict(resumed.state_dict())
            student.projections.load_state_dict(state["projections"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step = int(state["step"])  # <= max_steps: decide_run refused a checkpoint beyond it
            logs = state.get("logs", {})
            if d.main:
                print(f"resuming from {ckpt} (step {step})", flush=True)
        elif d.main:
            print(f"--resume: no checkpoint in {out}, starting from step 0", flush=True)

    ddp_student = student
    if d.world > 1:
        ddp_student = nn.parallel.DistributedDataParallel(student, device_ids=[d.local_rank] if device.type == "cuda"
                                                          else None)

    data = load_pretraining_dataset(args.dataset)
    train_set, dev_set = data["train"], data.get("validation")
    vocab_file = Path(vocab_dir) / "vocab.txt"
    collator = ChineseWWMCollator(tokenizer, args.mlm_probability, seed=args.seed)
    order = DataOrder(len(train_set), args.seed)
    A, B = args.gradient_accumulation_steps, args.batch_size
    global_batch = B * A * d.world
    need_hidden = any(m["feature"] == "hidden" for m in matches)
    need_att = needs_attentions(matches)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    checked: dict = {}
    if teacher is not None and step == 0:  # every rank decides alike (same data, same masks)
        checked = check_teacher(teacher, student.model, data, tokenizer, args, device, autocast)
    take_run(claim, request, d)

    writer = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "runs"))
    bar = tqdm(total=args.max_steps, initial=step, desc="distill", disable=not d.main, dynamic_ncols=True)
    sums: dict[str, float] = {}
    count = 0
    last_eval: dict = {}
    first_eval: dict = {}
    history: list[dict] = list(logs.get("history", []))  # a resumed run keeps the curves of its past
    dev_history: list[dict] = list(logs.get("dev_history", []))
    skipped: list[int] = list(logs.get("skipped", []))
    if args.eval_steps and dev_set is not None and len(dev_set) and d.main and step == 0:
        first_eval = checked or evaluate(student.model, teacher, dev_set, args.seed + 1, tokenizer, args, device,
                                         autocast)  # the teacher check already measured the dev split
        for name, value in first_eval.items():
            writer.add_scalar(f"dev/{name}", value, 0)
        tqdm.write("step 0: " + ", ".join(f"{k} {v:.4g}" for k, v in first_eval.items()))
        dev_history.append({"step": 0, **first_eval})
    t0 = time.perf_counter()
    student.train()
    try:
        while step < args.max_steps:
            terms_step: dict[str, float] = {}
            bad: list[str] = []
            for m in range(A):
                g = d.rank * A + m  # global micro-batch index within the step
                idx = order.indices(step * global_batch + g * B, B)
                collator.rng = np.random.default_rng([args.seed, step, g])
                batch = _to(collator([train_set[i] for i in idx]), device)
                select = batch["labels"] != -100
                torch.manual_seed(_sub_seed(args.seed, step, g))  # dropout: same on any number of processes
                sync = m == A - 1 or d.world == 1
                ctx = ddp_student.no_sync() if (d.world > 1 and not sync) else nullcontext()
                with ctx:
                    terms = distill_losses(teacher, ddp_student, student.projections, batch, select, matches, args,
                                           autocast, need_hidden, need_att)
                    total = sum(terms.values())
                    for name, value in terms.items():
                        if not torch.isfinite(value):
                            bad.append(f"term {name} = {value.item()}")
                    if bad and args.on_nonfinite == "stop":
                        raise CorpusError(f"non-finite loss at step {step + 1}: {bad[0]}; nothing saved for this step; "
                                          f"{_kept(out)} (--on_nonfinite skip skips such steps)")
                    (total / A).backward()  # even when skipping: every DDP rank must run the same collectives
                for name, value in terms.items():
                    terms_step[name] = terms_step.get(name, 0.0) + value.item() / A
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
            if not torch.isfinite(grad_norm):
                bad.append(f"gradient norm = {grad_norm.item()}")
            skip = bool(bad)
            if d.world > 1:  # every rank takes the same decision
                flag = torch.tensor([float(skip)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                skip = bool(flag.item())
            if skip and args.on_nonfinite == "stop":
                raise CorpusError(f"non-finite values at step {step + 1}: {bad[0] if bad else 'on another rank'}; the "
                                  f"weights were not updated; {_kept(out)}")
            if skip:
                skipped.append(step + 1)
                if d.main:
                    tqdm.write(f"step {step + 1}: skipped ({bad[0] if bad else 'non-finite on another rank'}); "
                               f"{len(skipped)} skipped so far")
                if len(skipped) > args.max_skipped_steps:
                    raise CorpusError(f"{len(skipped)} steps had non-finite losses or gradients (first: "
                                      f"{skipped[:5]}), more than --max_skipped_steps {args.max_skipped_steps}: "
                                      f"stopping; {_kept(out)}")
            else:
                optimizer.step()
            with warnings.catch_warnings():
                # A skipped step still advances the schedule (on purpose: the schedule follows the step count, which
                # resume relies on); torch warns when that happens before any optimizer step.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if not skip:
                for name, value in terms_step.items():
                    sums[name] = sums.get(name, 0.0) + value
                count += 1
            if d.main:
                bar.update(1)
                bar.set_postfix(loss=f"{sum(terms_step.values()):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if count and (step % args.logging_steps == 0 or step == args.max_steps):
                    history.append({"step": step, **{k: v / count for k, v in sums.items()}})
                    for name, value in sums.items():
                        writer.add_scalar(f"train/{name}", value / count, step)
                    writer.add_scalar("train/loss", sum(sums.values()) / count, step)
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                    writer.add_scalar("train/grad_norm", float(grad_norm), step)
                    sums, count = {}, 0
            if args.eval_steps and dev_set is not None and len(dev_set) and (
                    step % args.eval_steps == 0 or step == args.max_steps):
                if d.main:
                    last_eval = evaluate(student.model, teacher, dev_set, args.seed + 1, tokenizer, args, device,
                                         autocast)
                    dev_history.append({"step": step, **last_eval})
                    for name, value in last_eval.items():
                        writer.add_scalar(f"dev/{name}", value, step)
                    tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items()))
            if step % args.save_steps == 0 or step == args.max_steps:
                if d.main:
                    try:
                        save_checkpoint(out, step, student, optimizer, scheduler, vocab_file, args,
                                        args.save_total_limit,
                                        {"history": history, "dev_history": dev_history, "skipped": skipped})
                    except OSError as e:  # full disk, quota, permissions: the temp dir is gone, older ones intact
                        found = checkpoints(out)
                        kept = f"the newest complete checkpoint is {found[-1]}" if found else "no earlier checkpoint"
                        raise CorpusError(f"could not write the checkpoint of step {step} in {out}: {e}; {kept} "
                                          f"(untouched). Free space and re-run with --resume.") from None
                if d.world > 1:
                    dist.barrier()
    except KeyboardInterrupt:
        bar.close()
        raise KeyboardInterrupt(f"training stopped during step {step + 1}; {_kept(out)}") from None
    bar.close()

    summary = {"steps": step, "global_batch": global_batch, "world_size": d.world, "matches": matches,
               "seconds": time.perf_counter() - t0, "dev_start": first_eval, "dev": last_eval,
               "history": history, "dev_history": dev_history, "skipped_steps": skipped,
               "args": asdict(args)}
    if d.main:
        # the final student: a complete model folder at the top of output_dir (each file replaced atomically)
        with tempfile.TemporaryDirectory(dir=out, prefix=".final-") as tmp_name:
            tmp = Path(tmp_name)
            write_model_files(student.model, vocab_file, tmp)
            (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
            for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):  # config last
                os.replace(f, out / f.name)
        stages.mark_complete(stages.TRAINING_RUN, out)  # last: only now is the run "done"
        writer.close()
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
