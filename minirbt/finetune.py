"""Stage 5: CLUE fine-tuning, evaluation and task-specific distillation.

One loop for classification and span extraction: epochs over shuffled batches,
AdamW with linear warm-up/decay, evaluation on dev after every epoch, the best
epoch kept; several seeds, each from the same starting folder. With ``--teacher``
(a fine-tuned folder of the same task) the loss is TinyBERT's prediction-layer
distillation: ``kd_weight`` x soft cross-entropy at ``--temperature`` plus
``hard_label_weight`` x the usual cross-entropy, plus optional intermediate matches
(the pretraining format, :mod:`minirbt.matches`). ``--augment N`` adds N
variants of every training example in which words (jieba/LTP segmentation) are
replaced, with probability p, by a masked LM's predictions for the whole word;
the teacher labels them (they carry no gold label).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    get_linear_schedule_with_warmup,
)
from transformers.utils import logging as hf_logging

from minirbt import stages
from minirbt.cli import OVERWRITE_HELP, check_device, check_ranges, parse_seeds
from minirbt.faults import fault_point
from minirbt.matches import (
    KD_LOSSES,
    build_projections,
    check_matches,
    match_losses,
    needs_attentions,
    resolve_matches,
)
from minirbt.modeling import check_model_folder, load_config, load_error, resolve_model, write_model_files
from minirbt.optim import build_optimizer, parameter_groups
from minirbt.tasks import (
    BAD_ANSWER,
    LABELS,
    SMALL_MODEL_LR,
    Example,
    MRCExample,
    cmrc_score,
    read_classification,
    read_squad,
)
from minirbt.textio import CorpusError, atomic_path
from minirbt.tokenization import load_tokenizer


@dataclass
class FinetuneArguments:
    task: str = field(metadata={"help": "Task name (see --help of the script)."})
    model: str = field(metadata={"help": "Model folder or Hugging Face model id to fine-tune (e.g. hfl/rbt6)."})
    train_file: str = field(metadata={"help": "Training file in the task's native format."})
    dev_file: str = field(metadata={"help": "Dev file (scored after every epoch)."})
    output_dir: str = field(metadata={"help": "results.json, predictions and the best model go here."})
    test_file: str | None = field(default=None, metadata={"help": "Optional test file: predictions written."})
    learning_rate: float | None = field(default=None, metadata={
        "help": "Default: MiniRBT's recommendation: 2e-5 for 12-layer 768-wide models, else 1e-4 (OCNLI 5e-5)."})
    epochs: int = field(default=3, metadata={"help": "Training epochs."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per input (MRC: per window)."})
    seeds: str = field(default="1", metadata={"help": "Comma-separated seeds, e.g. 1,2,3."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (losses in fp32)."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Linear warm-up share."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not bias/LayerNorm)."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Use only the first N (quick runs)."})
    max_eval_examples: int | None = field(default=None, metadata={"help": "Score only the first N dev examples."})
    # task distillation
    teacher: str | None = field(default=None, metadata={"help": "Fine-tuned teacher folder: distil from it."})
    temperature: float = field(default=4.0, metadata={"help": "KD temperature (TextBrewer's default 4)."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the soft cross-entropy."})
    hard_label_weight: float = field(default=0.0, metadata={"help": "Weight of the gold-label loss with --teacher."})
    matches: list[str] = field(default_factory=list, metadata={"nargs": "*", "help": "Intermediate matches."})
    augment: int = field(default=0, metadata={"help": "Augmented variants per training example (needs --teacher)."})
    augment_prob: float = field(default=0.4, metadata={"help": "Probability of replacing each word."})
    augment_mlm: str | None = field(default=None, metadata={
        "help": "Masked-LM folder proposing replacements (default: --model if it has an MLM head)."})
    augment_candidates: int = field(default=15, metadata={"help": "Candidates per word (TinyBERT: 15)."})
    segmenter: str = field(default="jieba", metadata={"help": "Word segmenter for --augment: jieba or ltp."})
    ltp_model: str | None = field(default=None, metadata={"help": "LTP folder for --segmenter ltp."})
    # MRC
    doc_stride: int = field(default=128, metadata={"help": "MRC: overlap between context windows."})
    max_answer_length: int = field(default=30, metadata={"help": "MRC: longest answer in tokens."})
    n_best: int = field(default=20, metadata={"help": "MRC: start/end candidates per window."})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)."})
    resume: bool = field(default=False, metadata={
        "help": "Continue from the checkpoints in output_dir/checkpoints (one per seed and epoch)."})
    max_unusable_share: float = field(default=0.1, metadata={
        "help": "Refuse a train or dev file when more than this share of its rows is unusable (no gold label, "
                "bad fields, empty text, answers that do not match); every unusable row is counted either way."})
    overwrite_output: bool = field(default=False, metadata={"help": OVERWRITE_HELP})

    def __post_init__(self):
        check_ranges(self, at_least_1=("epochs", "batch_size", "max_seq_length", "max_train_examples",
                                       "max_eval_examples", "augment_candidates", "doc_stride", "max_answer_length",
                                       "n_best"),
                     non_negative=("weight_decay", "kd_weight", "hard_label_weight", "augment"),
                     positive=("learning_rate", "temperature"), probability=("augment_prob",),
                     fraction=("warmup_ratio",))
        if not 0 <= self.max_unusable_share <= 1:
            raise CorpusError(f"--max_unusable_share must be in [0, 1], got {self.max_unusable_share!r}")
        self.seed_list = parse_seeds(self.seeds)
        if self.segmenter not in ("jieba", "ltp"):
            raise CorpusError(f"--segmenter must be jieba or ltp, got {self.segmenter!r}")
        if self.max_seq_length < 8:
            raise CorpusError(f"--max_seq_length must be at least 8, got {self.max_seq_length}")


@dataclass
class MRCArguments(FinetuneArguments):
    """run_mrc.py: the same flags; windows of 512 tokens by default (MiniRBT's CMRC 2018 setting)."""

    max_seq_length: int = field(default=512, metadata={"help": "Tokens per window (question + context)."})

    def __post_init__(self):
        super().__post_init__()
        if self.doc_stride >= self.max_seq_length:
            raise CorpusError(f"--doc_stride {self.doc_stride} must be below --max_seq_length "
                              f"{self.max_seq_length} (it is the overlap between windows)")


# Settings that do not change a fine-tuning run's results: not part of its record (minirbt.stages). Input folders
# and files enter the record by content.
NOT_RECORDED = ("model", "train_file", "dev_file", "test_file", "output_dir", "teacher", "augment_mlm", "ltp_model",
                "device", "resume", "overwrite_output", "max_unusable_share", "seeds")
# What a fine-tuning run writes into its output_dir (removed when --overwrite_output replaces it).
RUN_FILES = ("checkpoints", "best", "results.json", "dev_predictions.*", "test_predictions.*", ".*.tmp-*")


def claim_output(args: FinetuneArguments, kind: stages.Kind) -> tuple[stages.Claim, dict]:
    """Claim output_dir (see minirbt.stages): refuse inputs and foreign folders; same settings are done or resume."""
    settings = {k: v for k, v in asdict(args).items() if k not in NOT_RECORDED}
    settings["seeds"] = args.seed_list
    inputs = {}
    for name in ("model", "teacher", "augment_mlm", "ltp_model"):
        folder = getattr(args, name)
        if folder:
            inputs[name] = stages.input_entry(folder, stages.model_fingerprint(folder) if name != "ltp_model"
                                              else stages.folder_fingerprint(folder))
    for name in ("train_file", "dev_file", "test_file"):
        path = getattr(args, name)
        if path:
            inputs[name] = stages.input_entry(path, stages.file_fingerprint(path))
    request = {"settings": settings, "inputs": inputs}
    claim = stages.claim(kind, args.output_dir, request, overwrite=args.overwrite_output, resume=args.resume,
                         inputs=[(f"--{k}", getattr(args, k)) for k in ("model", "teacher", "augment_mlm",
                                                                        "ltp_model", "train_file", "dev_file",
                                                                        "test_file")],
                         has_progress=lambda p: any((p / "checkpoints").glob("seed-*")))
    out = Path(args.output_dir)
    if claim.state == "replace":
        stages.clear_output(kind, out, RUN_FILES)
    if claim.state != "done":
        out.mkdir(parents=True, exist_ok=True)
        stages.write_record(kind, out, request, complete=False)
    return claim, request


def finished_results(args: FinetuneArguments) -> dict:
    results = json.loads((Path(args.output_dir) / stages.FINETUNE_RESULTS).read_text())
    print(f"{args.output_dir}: done, skipped (a finished run with the same settings and inputs; "
          f"--overwrite_output to run it again)", flush=True)
    return results | {"skipped": True}


def check_model_length(args: FinetuneArguments, *folders: str | None) -> None:
    """--max_seq_length must fit the position embeddings of the model (and teacher)."""
    for folder in folders:
        if folder:
            positions = load_config(Path(folder) / "config.json").max_position_embeddings
            if args.max_seq_length > positions:
                raise CorpusError(f"--max_seq_length {args.max_seq_length} is longer than {folder}'s "
                                  f"max_position_embeddings {positions}")


def default_lr(args: FinetuneArguments, config) -> float:
    if args.learning_rate is not None:
        return args.learning_rate
    if config.hidden_size >= 768 and config.num_hidden_layers >= 12:
        return 2e-5
    return SMALL_MODEL_LR.get(args.task, 1e-4)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _quiet_load(cls, folder: str, **kw):
    """from_pretrained without the 'newly initialized weights' notice (a new task head is expected)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(folder, **kw)
    except Exception as e:  # noqa: BLE001
        raise CorpusError(f"cannot load a model from {folder}: {load_error(e)}") from None
    finally:
        hf_logging.set_verbosity(level)


def _prepare(args: FinetuneArguments, train_ex: list, dev_ex: list, reports) -> tuple:
    """Subsets (--max_*_examples), what was read, device, autocast and the tokenizer."""
    train_ex = train_ex[: args.max_train_examples] if args.max_train_examples else train_ex
    dev_ex = dev_ex[: args.max_eval_examples] if args.max_eval_examples else dev_ex
    for rep in reports:
        print(rep.summary(), flush=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    return train_ex, dev_ex, device, autocast, load_tokenizer(args.model)


def _training_setup(args: FinetuneArguments, model, teacher, matches: list[dict], n_rows: int, device) -> tuple:
    """Match checks, projections, learning rate, optimizer and schedule for one seed."""
    if teacher is not None:
        check_matches(matches, teacher.config.num_hidden_layers, model.config.num_hidden_layers,
                      teacher.config.hidden_size, model.config.hidden_size,
                      teacher.config.num_attention_heads, model.config.num_attention_heads)
    projections = build_projections(matches).to(device)
    lr = default_lr(args, model.config)
    steps = math.ceil(n_rows / args.batch_size) * args.epochs
    opt, sched = _optimizer(model, projections, lr, args.weight_decay, steps, args.warmup_ratio)
    return projections, lr, opt, sched


def _optimizer(model, extra, lr, wd, total_steps, warmup):
    """PyTorch's AdamW (eps 1e-8) as in the transformers fine-tuning examples; projections without decay."""
    opt = build_optimizer(parameter_groups(model, extra, wd), lr, eps=1e-8, bias_correction=True)
    return opt, get_linear_schedule_with_warmup(opt, int(warmup * total_steps), total_steps)


def _kd(logits_s: torch.Tensor, logits_t: torch.Tensor, t: float) -> torch.Tensor:
    return KD_LOSSES["ce"](logits_s.float(), logits_t.float(), t)


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(teacher || student) between predicted distributions."""
    p = torch.log_softmax(torch.from_numpy(p_logits).float(), -1)
    q = torch.log_softmax(torch.from_numpy(q_logits).float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# ------------------------------------------------------------------ checkpoints (one per seed and epoch)
class SeedCheckpoints:
    """``output_dir/checkpoints/seed-S-epoch-E/``: after every epoch, the model, the best-on-dev weights so far,
    optimizer, schedule and torch RNG state (dropout), so a killed run resumes at the last finished epoch and
    ends with the same weights. ``seed-S-done/`` keeps a finished seed's record and best weights. Each folder
    is written atomically; older epochs are removed once a newer one is in place."""

    def __init__(self, output_dir: str | Path, seed: int, resume: bool):
        self.root = Path(output_dir) / "checkpoints"
        self.seed = seed
        if not resume and self.root.is_dir():
            for old in self.root.glob(f"seed-{seed}-*"):
                shutil.rmtree(old, ignore_errors=True)

    def _epochs(self) -> list[Path]:
        found = [p for p in self.root.glob(f"seed-{self.seed}-epoch-*") if (p / "state.pt").is_file()]
        return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))

    @property
    def done_dir(self) -> Path:
        return self.root / f"seed-{self.seed}-done"

    def finished(self) -> dict | None:
        record = self.done_dir / "record.json"
        return json.loads(record.read_text()) if record.is_file() else None

    def best_weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.done_dir / "best.safetensors"))

    def save_epoch(self, epoch: int, model, projections, opt, sched, best: dict, history: list[dict]) -> None:
        with atomic_path(self.root / f"seed-{self.seed}-epoch-{epoch}", is_dir=True, replace=True) as tmp:
            save_file(_contiguous(model.state_dict()), str(tmp / "model.safetensors"))
            save_file(_contiguous(best["state"]), str(tmp / "best.safetensors"))
            fault_point("finetune.checkpoint")
            torch.save({"epoch": epoch, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "projections": projections.state_dict(), "rng": torch.get_rng_state(),
                        "best": {k: v for k, v in best.items() if k != "state"},
                        "history": history}, tmp / "state.pt")
        for old in self._epochs()[:-1]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, model, projections, opt, sched) -> tuple[int, dict, list[dict]]:
        """(epochs done, best so far, history); (0, no best, []) without a checkpoint."""
        found = self._epochs()
        if not found:
            return 0, {}, []
        state = torch.load(found[-1] / "state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(load_file(str(found[-1] / "model.safetensors")))
        projections.load_state_dict(state["projections"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        best = dict(state["best"], state=load_file(str(found[-1] / "best.safetensors")))
        print(f"seed {self.seed}: resuming after epoch {state['epoch']} ({found[-1]})", flush=True)
        return int(state["epoch"]), best, list(state["history"])

    def finish(self, record: dict, best_state: dict[str, torch.Tensor]) -> None:
        with atomic_path(self.done_dir, is_dir=True, replace=True) as tmp:
            save_file(_contiguous(best_state), str(tmp / "best.safetensors"))
            (tmp / "record.json").write_text(json.dumps(record, indent=2) + "\n")
        for old in self._epochs():
            shutil.rmtree(old, ignore_errors=True)


def _kept(output_dir: str | Path) -> str:
    """What a stopped fine-tuning run leaves behind, truthfully."""
    root = Path(output_dir) / "checkpoints"
    done = sorted(p.name.split("-")[1] for p in root.glob("seed-*-done"))
    epochs = sorted(p.name for p in root.glob("seed-*-epoch-*") if (p / "state.pt").is_file())
    if not done and not epochs:
        return "no epoch had finished, nothing was kept: a re-run starts again"
    kept = ([f"finished seeds {', '.join(done)}"] if done else []) + ([f"checkpoints {', '.join(epochs)}"]
                                                                         if epochs else [])
    return f"kept in {root}: {'; '.join(kept)}; re-run with --resume to continue"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores no shared or strided tensors: tied weights are written as copies."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


# ------------------------------------------------------------------ classification
def _encode(tokenizer, examples: list[Example], max_len: int) -> list[dict]:
    enc = tokenizer([e.text_a for e in examples], [e.text_b for e in examples] if examples[0].text_b is not None
                    else None, truncation=True, max_length=max_len)
    return [{"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
             "label": -100 if e.label is None else e.label} for i, e in enumerate(examples)]


def _pad(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
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
    return out


@torch.no_grad()
def _logits(model, rows: list[dict], pad_id: int, batch_size: int, device, autocast) -> np.ndarray | tuple:
    model.eval()
    outs: list = []
    for i in range(0, len(rows), batch_size):
        b = _pad(rows[i : i + batch_size], pad_id)
        inputs = {k: b[k].to(device) for k in ("input_ids", "token_type_ids", "attention_mask")}
        with autocast:
            o = model(**inputs)
        if hasattr(o, "start_logits"):
            outs.append((o.start_logits.float().cpu().numpy(), o.end_logits.float().cpu().numpy()))
        else:
            outs.append(o.logits.float().cpu().numpy())
    model.train()
    if outs and isinstance(outs[0], tuple):
        return [s for s, _ in outs], [e for _, e in outs]
    return np.concatenate(outs) if outs else np.zeros((0, 1))


def augment_examples(examples: list[Example], n: int, prob: float, mlm_dir: str, segmenter, seed: int,
                     candidates: int = 15, device="cpu", max_length: int = 128) -> list[Example]:
    """TinyBERT-style augmentation for Chinese: whole words replaced by masked-LM predictions."""
    from minirbt.refs import is_cjk_word

    tokenizer = load_tokenizer(mlm_dir)
    mlm = _quiet_load(BertForMaskedLM, mlm_dir).to(device).eval()
    rng = random.Random(seed)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out: list[Example] = []

    def proposals(text: str) -> list[tuple[str, list[str]]]:
        """Each word of ``text`` with the replacements the MLM proposes for it (whole word masked)."""
        words = segmenter.segment([text])[0]
        spans, pos = [], 0
        for w in words:
            spans.append((w, pos))
            pos += len(w)
        todo = [i for i, (w, _) in enumerate(spans) if 1 <= len(w) <= 4 and is_cjk_word(w)]
        props = {i: [] for i in todo}
        if todo:
            masked = ["".join("[MASK]" * len(w) if j == i else w for j, (w, _) in enumerate(spans)) for i in todo]
            enc = tokenizer(masked, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            is_mask = enc["input_ids"] == tokenizer.mask_token_id
            with torch.no_grad():
                hidden = mlm.bert(**{k: v.to(device) for k, v in enc.items()}).last_hidden_state
                # the vocabulary projection only at the masked positions
                top = mlm.cls(hidden[is_mask.to(device)]).topk(candidates, dim=-1).indices.tolist()
            k = 0
            for row, i in enumerate(todo):
                n_mask = int(is_mask[row].sum())
                rows_top, k = top[k : k + n_mask], k + n_mask
                if n_mask != len(spans[i][0]):
                    continue  # truncated away
                for r in range(candidates):
                    cand = "".join(vocab[t[r]] for t in rows_top)
                    if cand != spans[i][0] and is_cjk_word(cand):
                        props[i].append(cand)
        return [(w, props.get(i, [])) for i, (w, _) in enumerate(spans)]

    for ex in tqdm(examples, desc="augmenting", leave=False):
        pa = proposals(ex.text_a)
        pb = proposals(ex.text_b) if ex.text_b is not None else None
        for _ in range(n):
            def sample(p):
                return "".join(rng.choice(c) if c and rng.random() < prob else w for w, c in p)

            out.append(Example(sample(pa), sample(pb) if pb is not None else None, None, ex.guid + "-aug"))
    return out


def _check_common(args: FinetuneArguments) -> None:
    """Model folders, device and lengths: everything decided before any file is read."""
    for name in ("model", "teacher", "augment_mlm"):  # local folders or Hugging Face model ids
        setattr(args, name, resolve_model(getattr(args, name), f"--{name}"))
    check_device(args.device)
    check_model_folder(args.model, "model")
    if args.teacher:
        check_model_folder(args.teacher, "teacher")
    check_model_length(args, args.model, args.teacher)
    if args.augment_mlm:
        check_model_folder(args.augment_mlm, "--augment_mlm")


def run_classification(args: FinetuneArguments) -> dict:
    if args.task not in LABELS:
        raise CorpusError(f"unknown classification task {args.task!r}: one of {', '.join(LABELS)}")
    _check_common(args)
    if not args.teacher and (args.augment or args.matches):
        raise CorpusError("--augment and --matches need --teacher (a fine-tuned teacher folder)")
    # with a teacher, rows without a gold label still teach (the teacher labels them)
    train_ex, train_rep = read_classification(args.task, args.train_file, keep_unlabelled=bool(args.teacher))
    train_rep.check(args.max_unusable_share, "training")
    dev_ex, dev_rep = read_classification(args.task, args.dev_file)
    dev_rep.check(args.max_unusable_share, "dev")
    test_ex, test_rep = read_classification(args.task, args.test_file, keep_unlabelled=True) if args.test_file \
        else (None, None)
    claim, _ = claim_output(args, stages.FINETUNE_RUN)
    if claim.state == "done":
        return finished_results(args)
    train_ex, dev_ex, device, autocast, tokenizer = _prepare(args, train_ex, dev_ex,
                                                             [r for r in (train_rep, dev_rep, test_rep) if r])
    n_labels = len(LABELS[args.task])
    matches = resolve_matches(args.matches)
    attn = "eager" if needs_attentions(matches) else None
    need_h = any(m["feature"] == "hidden" for m in matches)
    teacher = None
    if args.teacher:
        check_model_folder(args.teacher, "teacher")
        teacher = _quiet_load(BertForSequenceClassification, args.teacher,
                              **({"attn_implementation": attn} if attn else {})).to(device).eval()
        if teacher.config.num_labels != n_labels:
            raise CorpusError(f"teacher {args.teacher} has {teacher.config.num_labels} labels, task {args.task} "
                              f"has {n_labels}: is it fine-tuned on this task?")
    if args.augment:
        from minirbt.segmentation import make_segmenter

        mlm_dir = args.augment_mlm or args.model
        seg = make_segmenter(args.segmenter, args.ltp_model)
        extra = augment_examples(train_ex, args.augment, args.augment_prob, mlm_dir, seg, 0,
                                 args.augment_candidates, device, args.max_seq_length)
        print(f"augmentation: {len(extra)} new examples from {len(train_ex)}", flush=True)
        train_ex = train_ex + extra

    train_rows = _encode(tokenizer, train_ex, args.max_seq_length)
    dev_rows = _encode(tokenizer, dev_ex, args.max_seq_length)
    test_rows = _encode(tokenizer, test_ex, args.max_seq_length) if test_ex else None
    gold = np.array([e.label for e in dev_ex])
    test_gold = np.array([e.label for e in test_ex]) if test_ex and all(e.label is not None for e in test_ex) \
        else None
    teacher_dev = _logits(teacher, dev_rows, tokenizer.pad_token_id, 64, device, autocast) if teacher else None
    seeds = args.seed_list
    load_kw = {"num_labels": n_labels, **({"attn_implementation": attn} if attn else {})}
    per_seed = []
    t0 = time.perf_counter()
    try:
        for seed in seeds:
            ck = SeedCheckpoints(args.output_dir, seed, claim.state == "resume")
            record = ck.finished()
            if record is not None:
                print(f"seed {seed}: finished earlier ({ck.done_dir}), dev accuracy {record['accuracy']:.4f}",
                      flush=True)
                per_seed.append(record)
                continue
            _seed_all(seed)
            model = _quiet_load(BertForSequenceClassification, args.model, **load_kw).to(device)
            projections, lr, opt, sched = _training_setup(args, model, teacher, matches, len(train_rows), device)
            kl_before = _kl(teacher_dev, _logits(model, dev_rows, tokenizer.pad_token_id, 64, device, autocast)) \
                if teacher is not None else None
            start, best, history = ck.restore(model, projections, opt, sched) if claim.state == "resume" \
                else (0, {}, [])
            best = best or {"accuracy": -1.0}
            for epoch in range(start, args.epochs):
                order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
                bar = tqdm(range(0, len(order), args.batch_size), desc=f"seed {seed} epoch {epoch + 1}", leave=False)
                for i in bar:
                    b = _pad([train_rows[j] for j in order[i : i + args.batch_size].tolist()], tokenizer.pad_token_id)
                    b = {k: v.to(device) for k, v in b.items()}
                    inputs = {k: b[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
                    with autocast:
                        out = model(**inputs, output_hidden_states=need_h, output_attentions=bool(attn))
                    labels = b["label"]
                    has_gold = labels != -100
                    if teacher is None:
                        loss = F.cross_entropy(out.logits.float(), labels)
                    else:
                        with torch.no_grad(), autocast:
                            tout = teacher(**inputs, output_hidden_states=need_h, output_attentions=bool(attn))
                        loss = args.kd_weight * _kd(out.logits, tout.logits, args.temperature)
                        if args.hard_label_weight and has_gold.any():
                            loss = loss + args.hard_label_weight * F.cross_entropy(out.logits.float()[has_gold],
                                                                                   labels[has_gold])
                        for term in match_losses(matches, projections, out.hidden_states, tout.hidden_states,
                                                 out.attentions, tout.attentions, inputs["attention_mask"]):
                            loss = loss + term
                    if not torch.isfinite(loss):
                        raise CorpusError(f"non-finite loss ({loss.item()}) at seed {seed}, epoch {epoch + 1}, batch "
                                          f"{i // args.batch_size + 1}: nothing saved for this epoch")
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(projections.parameters()), 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                logits = _logits(model, dev_rows, tokenizer.pad_token_id, 64, device, autocast)
                acc = float((logits.argmax(-1) == gold).mean())
                history.append({"epoch": epoch + 1, "accuracy": acc})
                print(f"seed {seed} epoch {epoch + 1}: dev accuracy {acc:.4f}", flush=True)
                if acc > best["accuracy"]:
                    best = {"accuracy": acc, "epoch": epoch + 1, "state": _contiguous(model.state_dict())}
                ck.save_epoch(epoch + 1, model, projections, opt, sched, best, history)
            model.load_state_dict(best["state"])
            record = {"seed": seed, "accuracy": best["accuracy"], "best_epoch": best["epoch"], "history": history,
                      "learning_rate": lr}
            if teacher is not None:
                record["kl_to_teacher"] = {
                    "before": kl_before,
                    "after": _kl(teacher_dev, _logits(model, dev_rows, tokenizer.pad_token_id, 64, device, autocast))}
            if test_gold is not None:  # a labelled test file: score this seed's best-on-dev model on it
                test_logits = _logits(model, test_rows, tokenizer.pad_token_id, 64, device, autocast)
                record["test_accuracy"] = float((test_logits.argmax(-1) == test_gold).mean())
                print(f"seed {seed}: test accuracy {record['test_accuracy']:.4f} (epoch {best['epoch']})", flush=True)
            ck.finish(record, best["state"])
            per_seed.append(record)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"fine-tuning stopped; {_kept(args.output_dir)}") from None
    # the best seed's best epoch: predictions and the saved model
    best_record = max(per_seed, key=lambda r: r["accuracy"])  # first of equals: seed order
    model = _quiet_load(BertForSequenceClassification, args.model, **load_kw).to(device)
    model.load_state_dict(SeedCheckpoints(args.output_dir, best_record["seed"], True).best_weights())
    best_overall = {"seed": best_record["seed"], "model": model,
                    "logits": _logits(model, dev_rows, tokenizer.pad_token_id, 64, device, autocast)}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    majority = float(np.bincount(gold, minlength=n_labels).max() / len(gold))
    accs = [r["accuracy"] for r in per_seed]
    results = {"task": args.task, "metric": "accuracy", "accuracy": float(np.mean(accs)),
               "std": float(np.std(accs)), "per_seed": per_seed, "best": max(accs), "best_seed": best_overall["seed"],
               "majority_class_accuracy": majority, "train_examples": len(train_ex), "dev_examples": len(dev_ex),
               "read": {name: rep.as_dict() for name, rep in (("train", train_rep), ("dev", dev_rep),
                                                               ("test", test_rep)) if rep is not None},
               "seconds": time.perf_counter() - t0, "args": asdict(args)}
    if test_gold is not None:
        test_accs = [r["test_accuracy"] for r in per_seed]
        results |= {"test_accuracy": float(np.mean(test_accs)), "test_std": float(np.std(test_accs)),
                    "test_examples": len(test_gold),
                    "test_majority_class_accuracy": float(np.bincount(test_gold, minlength=n_labels).max()
                                                          / len(test_gold))}
    labels = LABELS[args.task]
    _write_jsonl(out / "dev_predictions.jsonl", [
        {"id": e.guid, "label": labels[int(p)], "gold": labels[e.label]}
        for e, p in zip(dev_ex, best_overall["logits"].argmax(-1))])
    if test_rows:
        tl = _logits(best_overall["model"], test_rows, tokenizer.pad_token_id, 64, device, autocast)
        _write_jsonl(out / "test_predictions.jsonl", [{"id": e.guid, "label": labels[int(p)]}
                                                       for e, p in zip(test_ex, tl.argmax(-1))])
    _save_best(best_overall["model"], args.model, out / "best")
    _write_json(out / stages.FINETUNE_RESULTS, results)
    stages.mark_complete(stages.FINETUNE_RUN, out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # everything is in best/ and results.json now
    return results


def _save_best(model, vocab_from: str, folder: Path) -> None:
    with atomic_path(folder, is_dir=True, replace=True) as tmp:
        write_model_files(model, Path(vocab_from) / "vocab.txt", tmp)


def _write_json(path: Path, obj) -> None:
    with atomic_path(path, replace=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path, replace=True) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# ------------------------------------------------------------------ span extraction (CMRC 2018, DRCD)
def _mrc_features(tokenizer, examples: list[MRCExample], args: FinetuneArguments, train: bool) -> list[dict]:
    enc = tokenizer([e.question for e in examples], [e.context for e in examples], truncation="only_second",
                    max_length=args.max_seq_length, stride=args.doc_stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True)
    rows = []
    for i in range(len(enc["input_ids"])):
        ex_idx = enc["overflow_to_sample_mapping"][i]
        ex = examples[ex_idx]
        seq_ids = enc.sequence_ids(i)
        offsets = [o if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq_ids)]
        row = {"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i], "example": ex_idx,
               "offsets": offsets}
        if train:
            if ex.answer_start is None:
                continue  # answer_start did not match the context: counted when reading
            s_char, e_char = ex.answer_start, ex.answer_start + len(ex.answers[0])
            ctx = [k for k, o in enumerate(offsets) if o is not None]
            if offsets[ctx[0]][0] <= s_char and offsets[ctx[-1]][1] >= e_char:
                start = next(k for k in ctx if offsets[k][1] > s_char)
                end = next(k for k in reversed(ctx) if offsets[k][0] < e_char)
            else:
                start = end = 0  # the answer is not in this window: point at [CLS]
            row.update(start_positions=start, end_positions=end)
        rows.append(row)
    return rows


def _decode(examples: list[MRCExample], rows: list[dict], starts, ends, n_best: int, max_len: int) -> dict:
    best: dict[int, tuple[float, str]] = {}
    flat_s = [x for b in starts for x in b]
    flat_e = [x for b in ends for x in b]
    for row, s_log, e_log in zip(rows, flat_s, flat_e):
        offsets = row["offsets"]
        n = len(offsets)
        s_idx = np.argsort(s_log[:n])[::-1][:n_best]
        e_idx = np.argsort(e_log[:n])[::-1][:n_best]
        ex = examples[row["example"]]
        for s in s_idx:
            for e in e_idx:
                if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_len:
                    continue
                score = float(s_log[s] + e_log[e])
                if row["example"] not in best or score > best[row["example"]][0]:
                    best[row["example"]] = (score, ex.context[offsets[s][0] : offsets[e][1]])
    return {ex.qid: best.get(i, (0.0, ""))[1] for i, ex in enumerate(examples)}


def _check_windows(tokenizer, examples: list[MRCExample], args: FinetuneArguments) -> None:
    """Every window holds the whole question, [CLS] + 2 x [SEP] and more context tokens than the overlap."""
    lengths = tokenizer([e.question for e in examples], add_special_tokens=False)["input_ids"]
    longest = max(range(len(examples)), key=lambda i: len(lengths[i]))
    room = args.max_seq_length - len(lengths[longest]) - 3
    if room <= args.doc_stride:
        raise CorpusError(f"--max_seq_length {args.max_seq_length} leaves {max(room, 0)} context tokens per window "
                          f"after the longest question ({len(lengths[longest])} tokens, id "
                          f"{examples[longest].qid}) and [CLS]/[SEP]/[SEP], not more than --doc_stride "
                          f"{args.doc_stride}: raise --max_seq_length or lower --doc_stride")


def run_mrc(args: FinetuneArguments) -> dict:
    if args.task not in ("cmrc2018", "drcd"):
        raise CorpusError(f"unknown reading-comprehension task {args.task!r}: cmrc2018 or drcd")
    if args.augment:
        raise CorpusError("--augment is for the classification tasks")
    if args.test_file:
        raise CorpusError("--test_file: run_mrc.py does not score a test file yet; score it as the --dev_file of "
                          "a second run")
    _check_common(args)
    train_ex, train_rep = read_squad(args.train_file, training=True)
    train_rep.check(args.max_unusable_share, "training")
    dev_ex, dev_rep = read_squad(args.dev_file)
    dev_rep.check(args.max_unusable_share, "dev")
    if args.resume:
        print("note: run_mrc.py keeps no per-epoch checkpoints yet; --resume starts an unfinished run again",
              flush=True)
    _check_windows(load_tokenizer(args.model), train_ex + dev_ex, args)
    claim, _ = claim_output(args, stages.MRC_RUN)
    if claim.state == "done":
        return finished_results(args)
    train_ex, dev_ex, device, autocast, tokenizer = _prepare(args, train_ex, dev_ex, (train_rep, dev_rep))
    train_rows = _mrc_features(tokenizer, train_ex, args, train=True)
    dev_rows = _mrc_features(tokenizer, dev_ex, args, train=False)
    matches = resolve_matches(args.matches)
    attn = "eager" if needs_attentions(matches) else None
    attn_kw = {"attn_implementation": attn} if attn else {}
    teacher = None
    if args.teacher:
        check_model_folder(args.teacher, "teacher")
        teacher = _quiet_load(BertForQuestionAnswering, args.teacher, **attn_kw).to(device).eval()
    elif matches:
        raise CorpusError("--matches needs --teacher (a fine-tuned teacher folder)")
    need_h = any(m["feature"] == "hidden" for m in matches)
    per_seed, best_overall = [], None
    t0 = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        _seed_all(seed)
        model = _quiet_load(BertForQuestionAnswering, args.model, **attn_kw).to(device)
        projections, lr, opt, sched = _training_setup(args, model, teacher, matches, len(train_rows), device)
        best = {"f1": -1.0}
        history = []
        for epoch in range(args.epochs):
            order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            for i in tqdm(range(0, len(order), args.batch_size), desc=f"seed {seed} epoch {epoch + 1}", leave=False):
                b = _pad([train_rows[j] for j in order[i : i + args.batch_size].tolist()], tokenizer.pad_token_id)
                b = {k: v.to(device) for k, v in b.items()}
                inputs = {k: b[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
                with autocast:
                    out = model(**inputs, output_hidden_states=need_h, output_attentions=bool(attn))
                s_log, e_log = out.start_logits.float(), out.end_logits.float()
                if teacher is None:
                    loss = (F.cross_entropy(s_log, b["start_positions"]) + F.cross_entropy(e_log, b["end_positions"]))
                    loss = loss / 2
                else:
                    with torch.no_grad(), autocast:
                        t = teacher(**inputs, output_hidden_states=need_h, output_attentions=bool(attn))
                    loss = args.kd_weight * (_kd(s_log, t.start_logits, args.temperature)
                                             + _kd(e_log, t.end_logits, args.temperature)) / 2
                    for term in match_losses(matches, projections, out.hidden_states, t.hidden_states,
                                             out.attentions, t.attentions, inputs["attention_mask"]):
                        loss = loss + term
                    if args.hard_label_weight:
                        loss = loss + args.hard_label_weight * (F.cross_entropy(s_log, b["start_positions"])
                                                                + F.cross_entropy(e_log, b["end_positions"])) / 2
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(projections.parameters()), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            starts, ends = _logits(model, dev_rows, tokenizer.pad_token_id, 32, device, autocast)
            preds = _decode(dev_ex, dev_rows, starts, ends, args.n_best, args.max_answer_length)
            score = cmrc_score(dev_ex, preds)
            history.append({"epoch": epoch + 1, **score})
            print(f"seed {seed} epoch {epoch + 1}: dev EM {score['em']:.2f} F1 {score['f1']:.2f}", flush=True)
            if score["f1"] > best["f1"]:
                best = {**score, "epoch": epoch + 1, "preds": preds,
                        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        per_seed.append({"seed": seed, "em": best["em"], "f1": best["f1"], "best_epoch": best["epoch"],
                         "history": history, "learning_rate": lr})
        if best_overall is None or best["f1"] > best_overall["f1"]:
            model.load_state_dict(best["state"])
            best_overall = {"f1": best["f1"], "seed": seed, "model": model, "preds": best["preds"]}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"task": args.task, "metric": "em/f1", "em": float(np.mean([r["em"] for r in per_seed])),
               "f1": float(np.mean([r["f1"] for r in per_seed])), "per_seed": per_seed,
               "best": {"em": max(r["em"] for r in per_seed), "f1": max(r["f1"] for r in per_seed)},
               "best_seed": best_overall["seed"], "train_features": len(train_rows), "dev_questions": len(dev_ex),
               "skipped_bad_answers": train_rep.unusable.get(BAD_ANSWER, 0),
               "read": {"train": train_rep.as_dict(), "dev": dev_rep.as_dict()},
               "seconds": time.perf_counter() - t0, "args": asdict(args)}
    _write_json(out / "dev_predictions.json", best_overall["preds"])
    _save_best(best_overall["model"], args.model, out / "best")
    _write_json(out / stages.FINETUNE_RESULTS, results)
    stages.mark_complete(stages.MRC_RUN, out)
    return results

