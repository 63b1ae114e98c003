"""Model folders: loading teachers safely, saving complete folders, TA surgery.

A *model folder* is what ``BertModel.from_pretrained`` and
``BertTokenizer.from_pretrained`` both load: ``config.json``, ``model.safetensors``,
``vocab.txt`` and ``tokenizer_config.json``. Every stage writes one (atomically)
and every stage reads one, so a stage-1 output is directly a stage-2 teacher.

Teacher-assistant initialisation (stage 3) copies the teacher's embeddings, a
chosen subset of its transformer layers and its whole MLM head into a student of
the same hidden size. Layer maps:

* ``uniform`` (default): layers spread over the teacher's depth,
  ``round(i * (L_T - 1) / (L_S - 1))``; for 12 -> 6 this is ``0,2,4,7,9,11``, the
  list MiniRBT's released code uses (it is what produced their RBT6);
* ``first``: layers ``0 .. L_S - 1`` (what MiniRBT's README describes);
* an explicit comma list such as ``0,2,4,7,9,11``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from importlib import resources
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM
from transformers.utils import logging as hf_logging

from minirbt.textio import CorpusError, atomic_path
from minirbt.tokenization import TOKENIZER_CONFIG, VOCAB_NAME

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_NAMES = ("roberta_wwm_ext", "rbt6", "rbt3", "rbt4_h312", "minirbt_h256", "minirbt_h288")


def config_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped config by name (``rbt6``, ``minirbt_h256``, ...) or a JSON file path."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = Path(str(resources.files("minirbt") / "configs" / f"{name_or_path}.json"))
    if shipped.is_file():
        return shipped
    raise CorpusError(f"student config not found: {name_or_path} (a JSON file, or one of {', '.join(CONFIG_NAMES)})")


def load_config(name_or_path: str | os.PathLike) -> BertConfig:
    path = config_path(name_or_path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not valid JSON ({e})") from None
    try:
        config = BertConfig(**{k: v for k, v in data.items() if k != "model_type"})
    except (TypeError, ValueError) as e:
        raise CorpusError(f"{path}: not a BERT config ({e})") from None
    if config.hidden_size % config.num_attention_heads:
        raise CorpusError(f"{path}: hidden_size {config.hidden_size} is not a multiple of "
                          f"num_attention_heads {config.num_attention_heads}")
    return config


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What a model folder needs from a hub repository (the weights in either format; no TF/Flax/ONNX files).
HUB_FILES = ["config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.json"]


def default_teacher_folder() -> Path:
    """The teacher's folder when none is given, the same for every script: ``pretrained_model_path/
    RoBERTa-wwm-ext`` (distill.sh's and the README's), or ``pretrained_model_path/RoBERTa`` (MiniRBT's scripts'
    name) when only that one exists."""
    models = Path(__file__).resolve().parent.parent / "pretrained_model_path"
    wwm, legacy = models / "RoBERTa-wwm-ext", models / "RoBERTa"
    return legacy if legacy.is_dir() and not wwm.is_dir() else wwm


def resolve_model(name: str | os.PathLike | None, what: str) -> str | None:
    """A local folder as given, or a Hugging Face model id (``hfl/chinese-roberta-wwm-ext``) resolved to its
    snapshot folder by ``huggingface_hub``: downloaded when online, from the local HF cache when offline
    (``HF_HUB_OFFLINE=1``). Weights still load only as tensors (safetensors, or ``weights_only``)."""
    if name is None or Path(name).exists() or not _HUB_ID.fullmatch(str(name)):
        return None if name is None else str(name)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(str(name), allow_patterns=HUB_FILES)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, network: the user needs the reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorpusError(f"{what} {name}: no such folder here, and the Hugging Face model {name} could not be "
                          f"fetched ({reason})") from None


def check_model_folder(folder: str | os.PathLike, what: str = "model folder") -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CorpusError(f"{what} not found: {folder} (see pretrained_model_path/README.md for what to put there)")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        missing.append("model.safetensors (or pytorch_model.bin)")
    if not (folder / VOCAB_NAME).is_file():
        missing.append(VOCAB_NAME)
    if missing:
        raise CorpusError(f"{what} {folder} lacks {', '.join(missing)}")
    return folder


def load_mlm(folder: str | os.PathLike, what: str = "teacher", attn_implementation: str | None = None,
             require_head: bool = False) -> BertForMaskedLM:
    """A ``BertForMaskedLM`` from a local folder (safetensors, or a .bin read with weights_only).

    ``require_head``: refuse a checkpoint without the MLM head (many public Chinese BERT releases carry encoder
    weights only; transformers would initialise ``cls.*`` at random and a KD loss would learn from noise)."""
    folder = check_model_folder(folder, what)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # missing keys are reported below, in one line
    try:
        model, info = BertForMaskedLM.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - safetensors/torch/json raise many kinds; the user needs the file
        raise CorpusError(f"cannot load {what} from {folder}: {load_error(e)}") from None
    finally:
        hf_logging.set_verbosity(level)
    head = sorted(k for k in info["missing_keys"] if k.startswith("cls.") and k != "cls.predictions.decoder.weight")
    if require_head and head:
        raise CorpusError(f"{what} {folder} has no MLM head: its weights lack {', '.join(head)} (an encoder-only "
                          "checkpoint; transformers would initialise the head at random and distillation would "
                          "learn from noise). Use the checkpoint with its pretraining head, e.g. "
                          "hfl/chinese-roberta-wwm-ext")
    other = sorted(k for k in info["missing_keys"] if not k.startswith("cls."))
    if other:
        raise CorpusError(f"{what} {folder}: its weights lack {', '.join(other[:6])}"
                          f"{f' and {len(other) - 6} more' if len(other) > 6 else ''}: not a BERT of this config")
    return model


_UNSAFE = re.compile(r"Unsupported global: GLOBAL (\S+)")


def load_error(e: BaseException) -> str:
    """One line saying why weights did not load. torch's refusal of an unsafe pickle goes on to suggest
    ``weights_only=False``, i.e. running the file's code: never repeat that advice."""
    text = str(e)
    if "weights_only" in text or "Weights only load failed" in text:
        hit = _UNSAFE.search(text)
        what = f"it would call {hit.group(1)}" if hit else "it holds objects other than tensors"
        return (f"the file is not a plain tensor checkpoint ({what}); minirbt loads weights only as tensors "
                "(safetensors, or torch.load with weights_only=True) and never runs code from a model file")
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def save_model_folder(model: BertForMaskedLM, vocab_from: str | os.PathLike, out: str | os.PathLike,
                      replace: bool = False, request: dict | None = None) -> Path:
    """Write a complete model folder atomically (weights, config, vocab, tokenizer config); with ``request``,
    also its record (:mod:`minirbt.stages`: the settings and inputs it was made from)."""
    from minirbt import stages

    vocab_from = Path(vocab_from)
    vocab = vocab_from / VOCAB_NAME if vocab_from.is_dir() else vocab_from
    with atomic_path(out, is_dir=True, replace=replace) as tmp:
        write_model_files(model, vocab, tmp)
        if request is not None:
            stages.write_record(stages.MODEL, tmp, request, complete=True)
    return Path(out)


def write_model_files(model: BertForMaskedLM, vocab_file: Path, folder: Path) -> None:
    model.save_pretrained(str(folder), safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config.pop("_attn_implementation_autoset", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(vocab_file, folder / VOCAB_NAME)
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def parse_layer_map(spec: str, n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer (0-based) for each student layer."""
    if spec == "first":
        layers = list(range(n_student))
    elif spec == "uniform":
        layers = [0] if n_student == 1 else [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]
    else:
        try:
            layers = [int(x) for x in spec.split(",")]
        except ValueError:
            raise CorpusError(f"--layer_map must be 'first', 'uniform' or a list like 0,2,4,7,9,11; got {spec!r}") \
                from None
        if len(layers) != n_student:
            raise CorpusError(f"--layer_map lists {len(layers)} layers but the student has {n_student}")
    bad = [x for x in layers if not 0 <= x < n_teacher]
    if bad:
        raise CorpusError(f"--layer_map: teacher layer(s) {bad} out of range 0..{n_teacher - 1}")
    if n_student > n_teacher:
        raise CorpusError(f"student has {n_student} layers, more than the teacher's {n_teacher}")
    return layers


MLM_HEAD_CHOICES = ("copy", "random")


def init_from_teacher(teacher: BertForMaskedLM, config: BertConfig, layer_map: str = "uniform",
                      mlm_head: str = "copy") -> tuple[BertForMaskedLM, list[int]]:
    """A student of ``config`` with the teacher's embeddings and chosen layers; its MLM head transform and bias
    copied from the teacher (``mlm_head="copy"``) or left as initialised (``"random"``: MiniRBT's released
    init_checkpoint_TA.py has the copy commented out). The decoder is tied to the embeddings either way."""
    if mlm_head not in MLM_HEAD_CHOICES:
        raise CorpusError(f"--mlm_head must be one of {', '.join(MLM_HEAD_CHOICES)}, got {mlm_head!r}")
    tc = teacher.config
    for key in ("hidden_size", "vocab_size", "max_position_embeddings", "type_vocab_size",
                "num_attention_heads", "intermediate_size"):
        if getattr(tc, key) != getattr(config, key):
            raise CorpusError(f"cannot copy layers: the teacher's {key} is {getattr(tc, key)}, the student "
                              f"config's is {getattr(config, key)} (a teacher assistant keeps the teacher's width)")
    layers = parse_layer_map(layer_map, tc.num_hidden_layers, config.num_hidden_layers)
    student = BertForMaskedLM(config)
    student.bert.embeddings.load_state_dict(teacher.bert.embeddings.state_dict())
    for s, t in enumerate(layers):
        student.bert.encoder.layer[s].load_state_dict(teacher.bert.encoder.layer[t].state_dict())
    if mlm_head == "copy":
        student.cls.load_state_dict(teacher.cls.state_dict())  # transform + bias; decoder tied to embeddings
    student.tie_weights()
    return student, layers


def count_parameters(config: BertConfig) -> tuple[int, int]:
    """Parameters of ``BertModel`` (with pooler), and without the embedding block."""
    from transformers import BertModel

    with torch.device("meta"):
        model = BertModel(config)
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for p in model.embeddings.parameters())
    return total, total - emb


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or from a ``.pkl``/``.bin``/``.pt`` state dict read with
    ``weights_only=True`` (a pickle that would run code is refused, not executed)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for unsafe globals, others for corrupt files
        raise CorpusError(f"{path}: not a plain tensor state dict: {load_error(e)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorpusError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def mlm_from_state_dict(state: dict[str, torch.Tensor], config: BertConfig, where: str = "checkpoint"
                        ) -> tuple[BertForMaskedLM, list[str]]:
    """A ``BertForMaskedLM`` from a MiniRBT/TextBrewer state dict (``module.`` prefixes of DDP stripped; bare
    ``BertModel`` keys accepted). Returns the model and the MLM-head keys that were absent (left as initialised).
    Any other missing or unexpected key, or a shape mismatch, is an error naming it."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith(("bert.", "cls.")) for k in state):
        state = {f"bert.{k}": v for k, v in state.items()}
    model = BertForMaskedLM(config)
    expected = model.state_dict()
    bad_shape = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
                 if k in expected and v.shape != expected[k].shape]
    if bad_shape:
        raise CorpusError(f"{where}: shapes differ from the config: {', '.join(bad_shape[:5])}")
    unexpected = [k for k in state if k not in expected and not k.endswith("position_ids")]
    if unexpected:
        raise CorpusError(f"{where}: keys the BERT config does not have: {', '.join(unexpected[:8])}")
    missing = [k for k in expected if k not in state]
    head_missing = [k for k in missing if k.startswith("cls.")]
    other = [k for k in missing if not k.startswith("cls.") and k != "cls.predictions.decoder.weight"]
    if other:
        raise CorpusError(f"{where}: missing weights: {', '.join(other[:8])}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    model.tie_weights()
    return model, [k for k in head_missing if k != "cls.predictions.decoder.weight"]


def build_teacher_assistant(teacher: str, student_config: str | os.PathLike, output: str | os.PathLike,
                            layer_map: str = "uniform", mlm_head: str = "copy", overwrite: bool = False) -> str:
    """Stage 3 (``scripts/init_checkpoint_TA.py``): a student of ``student_config`` initialised from the
    teacher's embeddings and layers, written as a model folder with its record; skipped when up to date.
    Returns what was done, for the log."""
    from minirbt import stages

    teacher = resolve_model(teacher, "--teacher")  # a folder or a Hugging Face model id
    check_model_folder(teacher, "teacher")
    config = load_config(student_config)
    teacher_config = load_config(Path(teacher) / "config.json")
    layers = parse_layer_map(layer_map, teacher_config.num_hidden_layers, config.num_hidden_layers)
    request = {"settings": {"student_config": config.to_diff_dict(), "layers": layers, "mlm_head": mlm_head},
               "inputs": {"teacher": stages.input_entry(teacher, stages.model_fingerprint(teacher))}}
    inputs = [("--teacher", teacher)]
    if Path(student_config).is_file():
        inputs.append(("--student_config", config_path(student_config)))
    claim = stages.claim(stages.MODEL, output, request, flag="--output", inputs=inputs, overwrite=overwrite)
    if claim.state == "done":
        return f"{output}: teacher assistant up to date (same teacher, config and layers), skipped"
    student, layers = init_from_teacher(load_mlm(teacher, require_head=mlm_head == "copy"), config, layer_map,
                                        mlm_head)
    save_model_folder(student, teacher, output, replace=True, request=request)
    return f"{output}: {student.config.num_hidden_layers} layers from teacher layers {layers}"
