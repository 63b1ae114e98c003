"""Stage 5, what every fine-tuning task shares: arguments, the output claim, and the training loop.

One loop for classification (:mod:`minirbt.classification`), span extraction
(:mod:`minirbt.mrc`) and token classification (:mod:`minirbt.ner`): for each seed, from the same
starting folder, epochs over shuffled batches, PyTorch's AdamW with linear warm-up/decay (``minirbt.optim``),
dev scores after every epoch, the best epoch kept, a checkpoint per epoch so a
killed run resumes (``--resume``, :class:`minirbt.checkpoints.SeedCheckpoints`). With
``--teacher`` (a fine-tuned folder of the same task) the loss is task distillation
through the shared core (:mod:`minirbt.distill`): ``kd_weight`` x soft cross-entropy
at ``--temperature`` + ``hard_label_weight`` x the usual loss + the intermediate
matches; without one, the usual loss alone.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from minirbt import stages
from minirbt.checkpoints import SeedCheckpoints, contiguous, finetuning_kept
from minirbt.cli import TrainingFlags, check_device, check_ranges, enable_tf32, parse_seeds, warn_emulated_bf16
from minirbt.distill import DistillConfig, distill_terms, nonfinite_terms
from minirbt.dropout import use_cpu_dropout
from minirbt.host_memory import keep_freed_host_memory
from minirbt.matches import build_projections, check_matches, encoder_layers, resolve_matches
from minirbt.modeling import check_model_folder, load_config, load_error, resolve_model, write_model_files
from minirbt.optim import Optimization
from minirbt.tasks import SMALL_MODEL_LR
from minirbt.textio import CorpusError, atomic_path
from minirbt.tokenization import load_tokenizer

# Fine-tuning uses PyTorch's AdamW at its default epsilon, as the transformers fine-tuning examples do.
FINETUNE_ADAM_EPSILON = 1e-8


@dataclass
class CommonArguments(TrainingFlags):
    """The flags of every fine-tuning script (run_classification.py, run_mrc.py, run_ner.py)."""

    task: str = field(metadata={"help": "Task name (see --help of the script)."})
    model: str = field(metadata={"help": "Model folder or Hugging Face model id to fine-tune (e.g. hfl/rbt6)."})
    train_file: str = field(metadata={"help": "Training file in the task's native format."})
    dev_file: str = field(metadata={"help": "Dev file (scored after every epoch)."})
    output_dir: str = field(metadata={"help": "results.json, predictions and the best model go here."})
    test_file: str | None = field(default=None, metadata={
        "help": "Optional test file: predictions written; when labelled, each seed's best-on-dev model is scored."})
    epochs: int = field(default=3, metadata={"help": "Training epochs."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    learning_rate: float | None = field(default=None, metadata={
        "help": "Default: MiniRBT's recommendation: 2e-5 for 12-layer 768-wide models, else 1e-4 (OCNLI 5e-5)."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per input (MRC: per window)."})
    seeds: str = field(default="1", metadata={"help": "Comma-separated seeds, e.g. 1,2,3."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Use only the first N (quick runs)."})
    max_eval_examples: int | None = field(default=None, metadata={"help": "Score only the first N dev examples."})
    # task distillation
    teacher: str | None = field(default=None, metadata={"help": "Fine-tuned teacher folder: distil from it."})
    temperature: float = field(default=4.0, metadata={"help": "KD temperature (TextBrewer's default 4)."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the soft cross-entropy."})
    hard_label_weight: float = field(default=0.0, metadata={"help": "Weight of the gold-label loss with --teacher."})
    matches: list[str] = field(default_factory=list, metadata={"nargs": "*", "help": "Intermediate matches."})
    max_unusable_share: float = field(default=0.1, metadata={
        "help": "Refuse a train or dev file when more than this share of its rows is unusable (no gold label, "
                "bad fields, empty text, answers that do not match); every unusable row is counted either way."})

    def __post_init__(self):
        check_ranges(self, at_least_1=("epochs", "batch_size", "max_seq_length", "max_train_examples",
                                       "max_eval_examples"),
                     non_negative=("weight_decay", "kd_weight", "hard_label_weight"),
                     positive=("learning_rate", "temperature", "max_grad_norm"), fraction=("warmup_ratio",))
        if not 0 <= self.max_unusable_share <= 1:
            raise CorpusError(f"--max_unusable_share must be in [0, 1], got {self.max_unusable_share!r}")
        self.seed_list = parse_seeds(self.seeds)
        if self.max_seq_length < 8:
            raise CorpusError(f"--max_seq_length must be at least 8, got {self.max_seq_length}")

    def distill_config(self) -> DistillConfig:
        """With --teacher: task distillation; without: the hard-label loss alone."""
        if self.teacher is None:
            return DistillConfig(self.temperature, kd_loss_weight=0.0, hard_label_weight=1.0)
        teacher = load_config(Path(self.teacher) / "config.json")
        student = load_config(Path(self.model) / "config.json")
        shapes = (teacher.num_hidden_layers, student.num_hidden_layers, teacher.hidden_size, student.hidden_size)
        return DistillConfig(self.temperature, kd_loss_weight=self.kd_weight,
                             hard_label_weight=self.hard_label_weight,
                             intermediate_matches=resolve_matches(self.matches, shapes))


# Settings that do not change a fine-tuning run's results: not part of its record (minirbt.stages). Input folders
# and files enter the record by content.
NOT_RECORDED = ("model", "train_file", "dev_file", "test_file", "output_dir", "teacher", "augment_mlm", "ltp_model",
                "device", "resume", "overwrite_output", "max_unusable_share", "seeds")
INPUT_FOLDERS = ("model", "teacher", "augment_mlm", "ltp_model")
INPUT_FILES = ("train_file", "dev_file", "test_file")
# What a fine-tuning run writes into its output_dir (removed when --overwrite_output replaces it).
RUN_FILES = ("checkpoints", "best", "results.json", "dev_predictions.*", "test_predictions.*", "predictions_*.txt",
             ".*.tmp-*")


def claim_output(args: CommonArguments, kind: stages.Kind) -> tuple[stages.Claim, dict]:
    """Claim output_dir (see minirbt.stages): refuse inputs and foreign folders; same settings are done or resume."""
    settings = {k: v for k, v in asdict(args).items() if k not in NOT_RECORDED}
    settings["seeds"] = args.seed_list
    if settings["max_grad_norm"] == 1.0:  # the value every run had before the flag existed: records stay valid
        del settings["max_grad_norm"]
    inputs = {}
    folders = [n for n in INPUT_FOLDERS if hasattr(args, n)]
    for name in folders:
        folder = getattr(args, name)
        if folder:
            inputs[name] = stages.input_entry(folder, stages.model_fingerprint(folder) if name != "ltp_model"
                                              else stages.folder_fingerprint(folder))
    for name in INPUT_FILES:
        path = getattr(args, name)
        if path:
            inputs[name] = stages.input_entry(path, stages.file_fingerprint(path))
    request = {"settings": settings, "inputs": inputs}
    claim = stages.claim(kind, args.output_dir, request, overwrite=args.overwrite_output, resume=args.resume,
                         inputs=[(f"--{k}", getattr(args, k)) for k in (*folders, *INPUT_FILES)],
                         has_progress=lambda p: any((p / "checkpoints").glob("seed-*")))
    out = Path(args.output_dir)
    if claim.state == "replace":
        stages.clear_output(kind, out, RUN_FILES)
    if claim.state != "done":
        out.mkdir(parents=True, exist_ok=True)
        stages.write_record(kind, out, request, complete=False)
    return claim, request


def finished_results(args: CommonArguments) -> dict:
    results = json.loads((Path(args.output_dir) / stages.FINETUNE_RESULTS).read_text())
    print(f"{args.output_dir}: done, skipped (a finished run with the same settings and inputs; "
          f"--overwrite_output to run it again)", flush=True)
    return results | {"skipped": True}


def check_common(args: CommonArguments) -> None:
    """Model folders, device and lengths: everything decided before any file is read."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:  # N copies would share one GPU and one --output_dir, deleting each other's checkpoints
        raise CorpusError(f"fine-tuning runs as one process, and this one was started as one of WORLD_SIZE={world} "
                          f"(torchrun?). A small model fine-tunes in minutes on one GPU: run one process per GPU "
                          f"instead, each with its own --output_dir and --seeds, e.g. CUDA_VISIBLE_DEVICES=1 python "
                          f"finetuning/run_classification.py ... --seeds 2 --output_dir out/seed2")
    for name in ("model", "teacher", "augment_mlm"):  # local folders or Hugging Face model ids
        if hasattr(args, name):
            setattr(args, name, resolve_model(getattr(args, name), f"--{name}"))
    check_device(args.device)
    check_model_folder(args.model, "model")
    if args.teacher:
        check_model_folder(args.teacher, "teacher")
    elif args.matches:
        raise CorpusError("--matches needs --teacher (a fine-tuned teacher folder)")
    for folder in (args.model, args.teacher):  # --max_seq_length must fit the position embeddings
        if folder:
            positions = load_config(Path(folder) / "config.json").max_position_embeddings
            if args.max_seq_length > positions:
                raise CorpusError(f"--max_seq_length {args.max_seq_length} is longer than {folder}'s "
                                  f"max_position_embeddings {positions}")
    if getattr(args, "augment_mlm", None):
        check_model_folder(args.augment_mlm, "--augment_mlm")


def default_lr(args: CommonArguments, config) -> float:
    if args.learning_rate is not None:
        return args.learning_rate
    if config.hidden_size >= 768 and config.num_hidden_layers >= 12:
        return 2e-5
    return SMALL_MODEL_LR.get(args.task, 1e-4)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet_load(cls, folder: str, **kw):
    """from_pretrained without the 'newly initialized weights' notice (a new task head is expected)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(folder, **kw)
    except Exception as e:  # noqa: BLE001
        raise CorpusError(f"cannot load a model from {folder}: {load_error(e)}") from None
    finally:
        hf_logging.set_verbosity(level)


def prepare(args: CommonArguments, train_ex: list, dev_ex: list, reports) -> tuple:
    """After the claim: --max_*_examples applied, what was read printed; the device, autocast and tokenizer."""
    from contextlib import nullcontext

    train_ex = train_ex[: args.max_train_examples] if args.max_train_examples else train_ex
    dev_ex = dev_ex[: args.max_eval_examples] if args.max_eval_examples else dev_ex
    for rep in reports:
        if rep is not None:
            print(rep.summary(), flush=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        enable_tf32()  # fine-tuning runs in fp32 unless --bf16
        warn_emulated_bf16(device, args.bf16)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    return train_ex, dev_ex, device, autocast, load_tokenizer(args.model)


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(teacher || student) between predicted distributions."""
    p = torch.log_softmax(torch.from_numpy(p_logits).float(), -1)
    q = torch.log_softmax(torch.from_numpy(q_logits).float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# ------------------------------------------------------------------ batches
INPUT_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def pad(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    tt = torch.zeros((len(rows), n), dtype=torch.long)
    att = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        tt[i, :k] = torch.tensor(r["token_type_ids"])
        att[i, :k] = 1
    out = {"input_ids": ids, "token_type_ids": tt, "attention_mask": att}
    for key in ("label", "start_positions", "end_positions"):
        if key in rows[0]:
            out[key] = torch.tensor([r[key] for r in rows])
    if "labels" in rows[0]:  # token classification: one label per position, -100 where nothing is scored
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        out["labels"] = labels
    return out


@torch.no_grad()
def predict(model, rows: list[dict], pad_id: int, batch_size: int, device, autocast) -> np.ndarray | tuple:
    """Classification logits (N, labels), or MRC (start list, end list) per batch."""
    model.eval()
    outs: list = []
    for i in range(0, len(rows), batch_size):
        b = pad(rows[i : i + batch_size], pad_id)
        with autocast:
            o = model(**{k: b[k].to(device) for k in INPUT_KEYS})
        if hasattr(o, "start_logits"):
            outs.append((o.start_logits.float().cpu().numpy(), o.end_logits.float().cpu().numpy()))
        else:
            outs.append(o.logits.float().cpu().numpy())
    model.train()
    if outs and isinstance(outs[0], tuple):
        return [s for s, _ in outs], [e for _, e in outs]
    return np.concatenate(outs) if outs else np.zeros((0, 1))


# ------------------------------------------------------------------ the loop
@dataclass
class TaskRun:
    """What a task gives the shared loop; :func:`fit_seeds` does the rest."""

    model_class: type
    load_kw: dict
    adaptor: Callable  # minirbt.distill: classification_adaptor or span_adaptor
    train_rows: list[dict]
    score: Callable  # model -> dev scores, e.g. {"accuracy": 0.9}
    metric: str  # the score that picks the best epoch and the best seed
    recorded: tuple[str, ...]  # the scores of the best epoch in a seed's record
    describe: Callable  # scores -> "dev accuracy 0.9000"
    before_training: Callable | None = None  # the fresh model of a seed -> what after_training is given
    after_training: Callable | None = None  # (the model at its best epoch, before, record) -> more record fields


def fit_seeds(args: CommonArguments, task: TaskRun, teacher, resume: bool, device, autocast, pad_id: int) -> list:
    """Train every seed (finished seeds of a resumed run are read back); one record per seed."""
    config = args.distill_config()
    per_seed = []
    try:
        for seed in args.seed_list:
            ck = SeedCheckpoints(args.output_dir, seed, resume)
            record = ck.finished()
            if record is None:
                record = fit_seed(args, task, teacher, config, ck, resume, device, autocast, pad_id)
            else:
                print(f"seed {seed}: finished earlier ({ck.done_dir}), {task.describe(record)}", flush=True)
            per_seed.append(record)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"fine-tuning stopped; {finetuning_kept(args.output_dir)}") from None
    return per_seed


def fit_seed(args: CommonArguments, task: TaskRun, teacher, config: DistillConfig, ck: SeedCheckpoints,
             resume: bool, device, autocast, pad_id: int) -> dict:
    seed = ck.seed
    seed_all(seed)
    model = quiet_load(task.model_class, args.model, **task.load_kw).to(device)
    use_cpu_dropout(model)  # the same dropout, cheaper CPU masks (minirbt.dropout): an H256 step 710 -> 541 ms
    if teacher is not None:
        check_matches(config.intermediate_matches, teacher.config.num_hidden_layers, model.config.num_hidden_layers,
                      teacher.config.hidden_size, model.config.hidden_size,
                      teacher.config.num_attention_heads, model.config.num_attention_heads)
    projections = build_projections(config.intermediate_matches).to(device)
    lr = default_lr(args, model.config)
    steps = math.ceil(len(task.train_rows) / args.batch_size) * args.epochs
    optimization = Optimization(model, projections, lr=lr, weight_decay=args.weight_decay,
                                eps=FINETUNE_ADAM_EPSILON, bias_correction=True,
                                warmup_steps=int(args.warmup_ratio * steps), total_steps=steps,
                                max_grad_norm=args.max_grad_norm)
    before = task.before_training(model) if task.before_training else None
    start, best, history = ck.restore(model, projections, optimization) if resume else (0, {}, [])
    best = best or {task.metric: -1.0}
    for epoch in range(start, args.epochs):
        train_epoch(args, task, model, teacher, config, projections, optimization, seed, epoch, device, autocast,
                    pad_id)
        scores = task.score(model)
        history.append({"epoch": epoch + 1, **scores})
        print(f"seed {seed} epoch {epoch + 1}: {task.describe(scores)}", flush=True)
        if scores[task.metric] > best[task.metric]:
            best = {**scores, "epoch": epoch + 1, "state": contiguous(model.state_dict())}
        ck.save_epoch(epoch + 1, model, projections, optimization, best, history)
    model.load_state_dict(best["state"])
    record = {"seed": seed, **{k: best[k] for k in task.recorded}, "best_epoch": best["epoch"], "history": history,
              "learning_rate": lr}
    if task.after_training:
        record |= task.after_training(model, before, record)
    ck.finish(record, best["state"])
    return record


def train_epoch(args: CommonArguments, task: TaskRun, model, teacher, config: DistillConfig, projections,
                optimization: Optimization, seed: int, epoch: int, device, autocast, pad_id: int) -> None:
    rows = task.train_rows
    keep_freed_host_memory()  # no page faults on a step's own activations (minirbt.host_memory)
    model.train()  # from_pretrained returns a model in eval mode: without this, dropout would depend on whether
    # a dev evaluation ran before the epoch (a resumed epoch would differ from an uninterrupted one)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    outputs = {"output_hidden_states": config.needs_hidden, "output_attentions": config.needs_attentions}
    bar = tqdm(range(0, len(order), args.batch_size), desc=f"seed {seed} epoch {epoch + 1}", leave=False)
    for i in bar:
        b = pad([rows[j] for j in order[i : i + args.batch_size].tolist()], pad_id)
        b = {k: v.to(device) for k, v in b.items()}
        inputs = {k: b[k] for k in INPUT_KEYS}
        with autocast:
            out = model(**inputs, **outputs)
        adapted_t = None
        if teacher is not None:
            with torch.no_grad(), autocast:
                adapted_t = task.adaptor(teacher(**inputs, **outputs), b, labels=False) | \
                    {"layers": encoder_layers(teacher)}
        adapted_s = task.adaptor(out, b, labels=bool(config.hard_label_weight)) | {"layers": encoder_layers(model)}
        terms = distill_terms(config, adapted_s, adapted_t, projections, inputs["attention_mask"])
        bad = nonfinite_terms(terms)
        if bad:
            raise CorpusError(f"non-finite loss ({bad[0]}) at seed {seed}, epoch {epoch + 1}, batch "
                              f"{i // args.batch_size + 1}: nothing saved for this epoch")
        loss = sum(terms.values())
        loss.backward()
        optimization.clip()
        optimization.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")


def best_model(args: CommonArguments, task: TaskRun, per_seed: list[dict], device) -> tuple[dict, object]:
    """The record of the best seed (first of equals: seed order) and its best-epoch model."""
    best = max(per_seed, key=lambda r: r[task.metric])
    model = quiet_load(task.model_class, args.model, **task.load_kw).to(device)
    model.load_state_dict(SeedCheckpoints(args.output_dir, best["seed"], True).best_weights())
    return best, model


def finish_run(args: CommonArguments, kind: stages.Kind, model, results: dict) -> None:
    """The best model folder and results.json, then the run is complete and its checkpoints go."""
    out = Path(args.output_dir)
    with atomic_path(out / "best", is_dir=True, replace=True) as tmp:
        write_model_files(model, Path(args.model) / "vocab.txt", tmp)
    write_json(out / stages.FINETUNE_RESULTS, results)
    stages.mark_complete(kind, out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # everything is in best/ and results.json now


def write_json(path: Path, obj) -> None:
    with atomic_path(path, replace=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path, replace=True) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
