"""What a pretraining run is, before it trains: its arguments, their checks, and its claim on output_dir.

``pretraining/train.py`` parses :class:`DistillArguments`; :func:`minirbt.trainer.train` runs them. Everything
here is decided from the arguments, configs and files alone, before any weights are loaded: a refused run
leaves its output folder as it was (``minirbt.stages``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.distributed as dist

from minirbt import stages
from minirbt.checkpoints import checkpoint_step, checkpoints
from minirbt.cli import TrainingFlags, check_device, check_ranges
from minirbt.data import MANIFEST, dataset_fingerprint
from minirbt.distill import DistillConfig
from minirbt.distributed import Dist, agree, on_every_rank
from minirbt.matches import KD_LOSSES, check_matches, resolve_matches
from minirbt.modeling import check_model_folder, load_config, resolve_model
from minirbt.textio import CorpusError
from minirbt.tokenization import load_tokenizer, vocab_fingerprint

SUMMARY_NAME = stages.TRAINING_SUMMARY
# What a training run writes into its output_dir (removed when --overwrite_output replaces the run).
RUN_FILES = ("checkpoint-*", ".checkpoint-*", ".final-*", "runs", SUMMARY_NAME, "config.json", "model.safetensors",
             "vocab.txt", "tokenizer_config.json")


# Settings of a training run that --accept_changed may let a resumed run continue under.
RESUME_CHANGEABLE = ("max_steps",)
# Settings that do not change the trained weights: never part of the run's record.
NOT_RECORDED = ("dataset", "output_dir", "teacher", "tokenizer", "student_init", "student_config", "save_steps",
                "save_total_limit", "eval_steps", "eval_batches", "logging_steps", "on_nonfinite",
                "min_teacher_accuracy", "max_skipped_steps", "resume", "recipe", "stage", "device",
                "overwrite_output", "accept_changed", "gradient_accumulation_steps", "dataloader_workers", "students",
                "torch_compile", "torch_compile_backend")


@dataclass
class DistillArguments(TrainingFlags):
    dataset: str = field(metadata={"help": "Dataset folder from pretraining/my_datasets.py."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Where the student, checkpoints and TensorBoard logs go (required, unless --students names them)."})
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
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon (MiniRBT: 1e-6)."})
    adam_bias_correction: bool = field(default=False, metadata={
        "help": "Bias-corrected Adam moments (PyTorch's AdamW). Default off: MiniRBT's transformers-4 "
                "AdamW(correct_bias=False), see minirbt/optim.py."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens chosen for prediction."})
    save_steps: int = field(default=1000, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int = field(default=3, metadata={"help": "Checkpoints kept (the newest)."})
    eval_steps: int = field(default=1000, metadata={"help": "Dev evaluation every N steps (0: never)."})
    eval_batches: int = field(default=50, metadata={"help": "Dev batches per evaluation."})
    min_teacher_accuracy: float = field(default=0.01, metadata={
        "help": "Before step 1 the teacher's masked-token accuracy on the dev split is measured and printed; "
                "below this floor (chance is ~0.005%%; an untrained MLM head scores about that) the run is "
                "refused. 0: distil anyway."})
    logging_steps: int = field(default=50, metadata={"help": "TensorBoard scalars every N steps."})
    on_nonfinite: str = field(default="stop", metadata={
        "help": "A NaN/inf loss or gradient: 'stop' (default; the last checkpoint is kept) or 'skip' the step."})
    max_skipped_steps: int = field(default=100, metadata={"help": "With --on_nonfinite skip: give up after N."})
    seed: int = field(default=42, metadata={"help": "Seed of data order, masks, dropout and init."})
    dataloader_workers: int = field(default=2, metadata={
        "help": "Worker processes that fetch and mask the next steps' batches while the current step runs (0: in "
                "the training process). Batches are the same either way: they depend on (seed, step) only."})
    torch_compile: bool = field(default=False, metadata={
        "help": "torch.compile the student's and the teacher's encoders (the first steps compile, which takes "
                "minutes; the rest run fused kernels). Numerically equal to eager up to rounding."})
    torch_compile_backend: str = field(default="inductor", metadata={
        "help": "With --torch_compile: the torch.compile backend (inductor; aot_eager traces without code "
                "generation)."})
    recipe: str | None = field(default=None, metadata={
        "help": "A recipe (pretraining/recipes/*.toml, or a shipped name: minirbt, demo, quick) whose --stage "
                "settings (its [distill] table and the stage's matches) replace these defaults; flags given here "
                "override them. What pretraining/distill.sh runs."})
    stage: str | None = field(default=None, metadata={"help": "With --recipe: the stage's name."})
    students: str | None = field(default=None, metadata={
        "help": "Several students from one teacher pass: a JSON file listing one object per student, each with its "
                "own output_dir and any of its own settings (student_config or student_init, matches, "
                "learning_rate, temperature, ...) over this command's flags; the teacher, data and steps are "
                "shared. Each student ends as its single-student run would."})
    accept_changed: list[str] = field(default_factory=list, metadata={
        "nargs": "*", "help": f"With --resume: settings allowed to differ from the run's record "
                              f"({', '.join(RESUME_CHANGEABLE)}; e.g. to continue a run to more steps)."})

    def __post_init__(self):
        if (self.output_dir is None) == (self.students is None):
            raise CorpusError("--output_dir is required (or --students FILE, whose entries each name one)"
                              if self.output_dir is None else
                              "--output_dir and --students: each student in the --students file names its own "
                              "output_dir")
        check_ranges(self, at_least_1=("max_steps", "batch_size", "gradient_accumulation_steps", "save_steps",
                                       "eval_batches", "logging_steps"),
                     non_negative=("kd_weight", "mlm_weight", "weight_decay", "eval_steps", "save_total_limit",
                                   "max_skipped_steps", "seed", "dataloader_workers"),
                     positive=("temperature", "learning_rate", "max_grad_norm", "adam_epsilon"),
                     probability=("mlm_probability",), fraction=("warmup_ratio", "min_teacher_accuracy"))

    def loss_weights(self) -> tuple[float, float]:
        """(kd_weight, mlm_weight), unset ones at their defaults: KD alone with a teacher, MLM alone without."""
        kd_default, mlm_default = (1.0, 0.0) if self.teacher is not None else (0.0, 1.0)
        return (kd_default if self.kd_weight is None else self.kd_weight,
                mlm_default if self.mlm_weight is None else self.mlm_weight)

    def distill_config(self, matches: list[dict]) -> DistillConfig:
        """The loss of this run, in minirbt.distill's terms."""
        kd_weight, mlm_weight = self.loss_weights()
        return DistillConfig(self.temperature, kd_loss_type=self.kd_loss, kd_loss_weight=kd_weight,
                             hard_label_weight=mlm_weight, intermediate_matches=matches)


# ------------------------------------------------------------------ setup checks
def check_inputs(args: DistillArguments) -> None:
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
    else:
        check_model_folder(args.teacher, "teacher")
    args.kd_weight, args.mlm_weight = args.loss_weights()  # recorded as they are used
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


def request_digest(request: dict) -> str:
    """A short hash of a run's settings and its inputs' contents (not their paths, which may differ by node)."""
    inputs = {k: v["fingerprint"] for k, v in request["inputs"].items()}
    text = json.dumps({"settings": request["settings"], "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def vocab_check(tokenizer, vocab_dir: str, dataset_dir: str, student_vocab: int, teacher_vocab: int | None) -> None:
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


def model_configs(args: DistillArguments) -> tuple:
    """(teacher config or None, student config), from the folders or --student_config."""
    teacher_conf = load_config(Path(args.teacher) / "config.json") if args.teacher else None
    student_conf = load_config(Path(args.student_init) / "config.json" if args.student_init else args.student_config)
    return teacher_conf, student_conf


def run_matches(args: DistillArguments) -> list[dict]:
    """--matches resolved; a rule (``uniform_hidden_mse``) from the teacher's and the student's shapes."""
    teacher_conf, student_conf = model_configs(args)
    shapes = None if teacher_conf is None else (teacher_conf.num_hidden_layers, student_conf.num_hidden_layers,
                                                teacher_conf.hidden_size, student_conf.hidden_size)
    return resolve_matches(args.matches, shapes)


def check_shapes(args: DistillArguments, matches: list[dict]) -> None:
    """Everything that the configs and the vocab decide, before the run claims its output."""
    teacher_conf, student_conf = model_configs(args)
    vocab_dir = args.tokenizer or args.teacher or args.student_init
    vocab_check(load_tokenizer(vocab_dir), vocab_dir, args.dataset, student_conf.vocab_size,
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


# ------------------------------------------------------------------ several students from one teacher pass
# Settings every student of one teacher pass shares: they decide the teacher's forward (its inputs: data order,
# masks, steps) or the loop's schedule. The others (output_dir, student, matches, loss weights, temperature,
# optimizer settings, ...) are each student's own.
ONE_PASS_SHARED = ("dataset", "teacher", "tokenizer", "max_steps", "batch_size", "gradient_accumulation_steps",
                   "mlm_probability", "seed", "device", "bf16", "dataloader_workers", "save_steps", "eval_steps",
                   "eval_batches", "min_teacher_accuracy", "torch_compile", "torch_compile_backend")


def check_one_pass(students: list[DistillArguments]) -> None:
    """Students trained from one teacher pass: at least one, distinct output folders, the shared settings equal."""
    if not students:
        raise CorpusError("no student to train (--students lists none)")
    outs = [str(Path(a.output_dir).resolve()) for a in students]
    for i, out in enumerate(outs):
        if out in outs[:i]:
            raise CorpusError(f"two students write to {students[i].output_dir}: each needs its own output_dir")
    first = students[0]
    for a in students[1:]:
        for name in ONE_PASS_SHARED:
            if getattr(a, name) != getattr(first, name):
                raise CorpusError(f"students trained from one teacher pass share {name}: {first.output_dir} has "
                                  f"{getattr(first, name)!r}, {a.output_dir} has {getattr(a, name)!r}")


def read_students(args: DistillArguments) -> list[DistillArguments]:
    """--students FILE: a JSON list of objects, each one student's own settings (output_dir required; any
    DistillArguments field but the shared ones) over this command's flags (the file is read as data)."""
    path = Path(args.students)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorpusError(f"--students {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise CorpusError(f"--students {path}: not JSON ({e})") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise CorpusError(f"--students {path}: expected a non-empty JSON list of objects, one per student")
    fields = set(DistillArguments.__dataclass_fields__) - {"students", "recipe", "stage"}
    students = []
    for n, entry in enumerate(entries, 1):
        unknown = sorted(set(entry) - fields)
        shared = sorted(set(entry) & set(ONE_PASS_SHARED))
        if unknown or shared or "output_dir" not in entry:
            what = (f"unknown settings {unknown}" if unknown else f"shared settings {shared} belong on the "
                    f"command line" if shared else "no output_dir")
            raise CorpusError(f"--students {path}, student {n}: {what}")
        base = {k: v for k, v in asdict(args).items() if k != "students"}
        if "student_init" in entry or "student_config" in entry:  # the entry names its student, alone
            base |= {"student_init": None, "student_config": None}
        try:
            students.append(DistillArguments(**(base | entry)))
        except (TypeError, ValueError, CorpusError) as e:
            raise CorpusError(f"--students {path}, student {n}: {e}") from None
    return students


@dataclass
class Plan:
    """One student's run as decided before anything loads: its matches and its claim on output_dir."""

    args: DistillArguments
    matches: list[dict]
    claim: stages.Claim
    request: dict


def plan_runs(students: list[DistillArguments], d: Dist) -> list[Plan]:
    """Every student's inputs, shapes and output folder checked (on every rank, agreed), before anything loads."""
    def setup() -> list[Plan]:
        plans = []
        for args in students:
            check_inputs(args)
            matches = run_matches(args)
            check_shapes(args, matches)
            plans.append(Plan(args, matches, *decide_run(args, d, matches)))
        return plans

    plans = on_every_rank(d, setup, "checking the run's inputs and output folder")
    for p in plans:
        found = checkpoints(Path(p.args.output_dir)) if p.claim.state == "resume" else []
        agree(d, {"output_dir": p.claim.state, "resume_from_step": checkpoint_step(found[-1]) if found else 0,
                  "settings_and_inputs": request_digest(p.request)}, f"the run of {p.args.output_dir}")
    return plans


def finished_summary(args: DistillArguments) -> dict:
    """What a skipped (already finished) run returns: its recorded summary, marked skipped."""
    summary_file = Path(args.output_dir) / SUMMARY_NAME
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return {"steps": args.max_steps, "seconds": 0.0, "dev": {}} | summary | {"skipped": True}


