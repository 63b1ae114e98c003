"""Stage 2: corpus lines + refs -> fixed-length chunks in an Arrow dataset.

Each split (``train``, ``validation``) is built in three ``datasets`` steps, each
cached by a fingerprint of its inputs:

1. *lines*: every corpus line (the one definition of :mod:`minirbt.textio`) with
   its ref, after checking that ref files and corpus files have the same number of
   lines. Ref files made by MiniRBT's script (one per *non-blank* line) are
   recognised by their count and aligned to the non-blank lines.
2. *tokens*: each line tokenized exactly as stage 1 did (stripped, no special
   tokens, no truncation), refs checked to lie inside their line
   (``datasets.map`` with ``num_proc``).
3. *chunks*: all lines of a split concatenated and cut into
   ``[CLS] + (max_seq_length - 2) tokens + [SEP]``, refs re-based to each chunk, in
   one linear streaming pass. The last, shorter chunk is kept. A ref that would be
   a chunk's first token (its word began in the previous chunk) is dropped, so the
   piece of the word inside the chunk is masked as a word of its own.

The result is a ``DatasetDict`` saved with ``save_to_disk`` (written to a temporary
folder, then renamed) plus ``minirbt_dataset.json`` describing how it was made.
Re-running with the same inputs finds that manifest and does nothing.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, Sequence, Value

from minirbt import __version__, stages
from minirbt.textio import CorpusError, atomic_path, count_lines, is_blank, iter_lines, require_file
from minirbt.tokenization import NOT_CJK, LineTokenizer, load_tokenizer, token_char, vocab_fingerprint

MANIFEST = stages.DATASET.record  # minirbt_dataset.json
COLUMNS = ("input_ids", "chinese_ref")


@dataclass
class SplitSpec:
    """Corpus files of one split and their ref files, in the same order."""

    files: list[Path]
    refs: list[Path]
    alignment: list[str] = field(default_factory=list)  # per file: "lines" or "non-blank lines"


def check_split(name: str, files: list[str | os.PathLike], refs: list[str | os.PathLike]) -> SplitSpec:
    """Every file present and non-empty, one ref file per corpus file, same line counts."""
    if len(files) != len(refs):
        raise CorpusError(f"{name}: {len(files)} corpus files but {len(refs)} ref files (give one ref file per file)")
    spec = SplitSpec([], [])
    for f, r in zip(files, refs):
        f = require_file(f, f"{name} corpus file")
        r = require_file(r, f"{name} ref file for {f.name}", allow_empty=True)
        n_lines, n_refs = count_lines(f), count_lines(r)
        if n_refs == n_lines:
            spec.alignment.append("lines")
        else:
            n_text = sum(1 for line in iter_lines(f, errors="replace") if not is_blank(line))
            if n_refs == n_text:
                spec.alignment.append("non-blank lines")
            else:
                raise CorpusError(
                    f"{r} has {n_refs} refs but {f} has {n_lines} lines ({n_text} non-blank): the ref file "
                    "does not belong to this corpus file, or one of them changed. Re-run run_chinese_ref.py.")
        spec.files.append(f)
        spec.refs.append(r)
    return spec


def _signature(spec: SplitSpec) -> list:
    out = []
    for f, r in zip(spec.files, spec.refs):
        for p in (f, r):
            st = p.stat()
            out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _line_records(files: list[str], refs: list[str], alignment: list[str], errors: str) -> Iterator[dict]:
    for index, (f, r, align) in enumerate(zip(files, refs, alignment)):
        ref_lines = iter_lines(r)
        for lineno, line in enumerate(iter_lines(f, errors=errors), start=1):
            if align == "non-blank lines" and is_blank(line):
                ref: list = []
            else:
                raw = next(ref_lines)
                try:
                    ref = json.loads(raw)
                except json.JSONDecodeError:
                    raise CorpusError(f"{r}: ref for {f}:{lineno} is not JSON: {raw[:80]!r}") from None
                if not isinstance(ref, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ref):
                    raise CorpusError(f"{r}: ref for {f}:{lineno} is not a list of integers: {raw[:80]!r}")
            yield {"text": line, "chinese_ref": ref, "file": index, "line": lineno}


_TOKENIZERS: dict[str, tuple[LineTokenizer, list[bool]]] = {}


def _line_tokenizer(tokenizer_dir: str) -> tuple[LineTokenizer, list[bool]]:
    """The tokenizer of a folder, and per token id whether it can be part of a Chinese word."""
    if tokenizer_dir not in _TOKENIZERS:
        tok = load_tokenizer(tokenizer_dir)
        by_id = tok.convert_ids_to_tokens(list(range(len(tok))))
        _TOKENIZERS[tokenizer_dir] = (LineTokenizer(tok), [token_char(t) != NOT_CJK for t in by_id])
    return _TOKENIZERS[tokenizer_dir]


def _tokenize(batch: dict, tokenizer_dir: str, files: list[str], refs: list[str]) -> dict:
    lt, chinese = _line_tokenizer(tokenizer_dir)
    ids = lt.ids([t.strip() for t in batch["text"]])  # stripped, as stage 1 saw the line
    for tokens, ref, fi, lineno in zip(ids, batch["chinese_ref"], batch["file"], batch["line"]):
        n = len(tokens)
        for r in ref:
            if not 1 <= r <= n:
                raise CorpusError(
                    f"{refs[fi]}: ref position {r} for {files[fi]}:{lineno} is outside the line's {n} tokens "
                    f"(valid: 1..{n}, [CLS] = 0). Were the refs made with another tokenizer?")
            # a ref marks a Chinese character that continues a word: it follows another Chinese character
            if r < 2 or not (chinese[tokens[r - 1]] and chinese[tokens[r - 2]]):
                shown = lt.tokenizer.convert_ids_to_tokens(tokens[max(0, r - 2) : r])
                raise CorpusError(
                    f"{refs[fi]}: ref position {r} for {files[fi]}:{lineno} marks {shown[-1]!r} after "
                    f"{shown[0] if r >= 2 else '[CLS]'!r}, not a Chinese character continuing a word. The ref "
                    "file does not belong to this corpus file (or was made with another tokenizer): re-run "
                    "run_chinese_ref.py.")
    return {"input_ids": ids, "chinese_ref": batch["chinese_ref"]}


def _chunks(tokens: Dataset, fingerprint: str, cls_id: int, sep_id: int, block: int) -> Iterator[dict]:
    del fingerprint  # only part of the cache key
    buf: list[int] = []
    buf_refs: list[int] = []  # ascending positions in buf (0-based) that continue a word
    for batch in tokens.iter(batch_size=1000):
        for ids, ref in zip(batch["input_ids"], batch["chinese_ref"]):
            offset = len(buf)
            buf.extend(ids)
            buf_refs.extend(offset + r - 1 for r in ref)
            if len(buf) < block:
                continue
            start, k = 0, 0
            while len(buf) - start >= block:
                end = start + block
                j = bisect.bisect_left(buf_refs, end, lo=k)
                # chunk position = buffer position - start + 1 ([CLS] first); the first
                # token of a chunk has no word head in it, so a ref there is dropped.
                yield {"input_ids": [cls_id, *buf[start:end], sep_id],
                       "chinese_ref": [p - start + 1 for p in buf_refs[k:j] if p > start]}
                start, k = end, j
            buf = buf[start:]
            buf_refs = [p - start for p in buf_refs[k:]]
    if buf:
        yield {"input_ids": [cls_id, *buf, sep_id], "chinese_ref": [p + 1 for p in buf_refs if p > 0]}


@contextlib.contextmanager
def _corpus_errors() -> Iterator[None]:
    """``datasets`` wraps errors raised in generators; give the user ours back."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unchanged unless one of ours is inside
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, CorpusError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None and cause is not e:
            raise cause from None
        raise


def _build_split(name: str, spec: SplitSpec, tokenizer_dir: str, special_ids: tuple[int, int], vocab_id: str,
                 max_seq_length: int, num_workers: int, errors: str, cache_dir: str | None) -> tuple[Dataset, dict]:
    files = [str(f) for f in spec.files]
    refs = [str(r) for r in spec.refs]
    key = _fingerprint(__version__, _signature(spec), spec.alignment, errors)
    with _corpus_errors():
        return _build_split_steps(name, files, refs, spec, key, tokenizer_dir, special_ids, vocab_id,
                                  max_seq_length, num_workers, errors, cache_dir)


def _build_split_steps(name: str, files: list[str], refs: list[str], spec: SplitSpec, key: str,
                       tokenizer_dir: str, special_ids: tuple[int, int], vocab_id: str, max_seq_length: int,
                       num_workers: int, errors: str, cache_dir: str | None) -> tuple[Dataset, dict]:
    lines = Dataset.from_generator(
        _line_records,
        gen_kwargs={"files": files, "refs": refs, "alignment": spec.alignment, "errors": errors},
        features=Features({"text": Value("string"), "chinese_ref": Sequence(Value("int32")),
                           "file": Value("int32"), "line": Value("int64")}),
        cache_dir=cache_dir, fingerprint=f"lines-{key}", split="train",
    )
    num_proc = max(1, min(num_workers, len(lines) // 20_000))
    tokens = lines.map(
        _tokenize, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tokenizer_dir": tokenizer_dir, "files": files, "refs": refs},
        remove_columns=["text", "file", "line"],
        # datasets caps fingerprints at 64 characters and appends "_00000_of_0000N" per worker: keep it short
        new_fingerprint=_fingerprint("tokens", key, vocab_id),
        features=Features({"input_ids": Sequence(Value("int32")), "chinese_ref": Sequence(Value("int32"))}),
        desc=f"tokenizing {name}",
    )
    n_input = pc.sum(pc.list_value_length(tokens.data.column("input_ids"))).as_py() if len(tokens) else 0
    if not n_input:
        raise CorpusError(f"the {name} corpus has no tokens: its {len(lines)} lines are all blank "
                          f"({', '.join(files)})")
    block = max_seq_length - 2
    chunks = Dataset.from_generator(
        _chunks,
        gen_kwargs={"tokens": tokens, "fingerprint": tokens._fingerprint, "cls_id": special_ids[0],
                    "sep_id": special_ids[1], "block": block},
        features=Features({"input_ids": Sequence(Value("int32")), "chinese_ref": Sequence(Value("int32"))}),
        cache_dir=cache_dir, fingerprint=_fingerprint("chunks", key, vocab_id, max_seq_length), split="train",
    )
    stats = {"files": files, "ref_files": refs, "alignment": spec.alignment, "lines": len(lines),
             "tokens": n_input, "chunks": len(chunks)}  # chunking keeps every token
    return chunks, stats


def build_pretraining_dataset(
    train_files: list[str | os.PathLike],
    train_refs: list[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    max_seq_length: int = 512,
    dev_files: list[str | os.PathLike] | None = None,
    dev_refs: list[str | os.PathLike] | None = None,
    num_workers: int = 1,
    errors: str = "strict",
    cache_dir: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Build (or find up to date) the chunked dataset; returns its record (``minirbt_dataset.json``).

    The output folder is claimed first (:func:`minirbt.stages.claim`): a dataset of other settings or inputs is
    replaced only with ``overwrite``; a folder of anything else is refused."""
    if max_seq_length < 8:
        raise CorpusError(f"--max_seq_length must be at least 8, got {max_seq_length}")
    tokenizer = load_tokenizer(tokenizer_dir)  # clear error for a folder without a vocab
    config = Path(tokenizer_dir) / "config.json"
    if config.is_file():  # a model folder: chunks must fit its position embeddings
        try:
            positions = json.loads(config.read_text()).get("max_position_embeddings")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            positions = None
        if isinstance(positions, int) and max_seq_length > positions:
            raise CorpusError(f"--max_seq_length {max_seq_length} is longer than the model's "
                              f"max_position_embeddings {positions} ({config})")
    splits = {"train": check_split("train", train_files, train_refs)}
    if dev_files:
        splits["validation"] = check_split("dev", dev_files, dev_refs or [])
    elif dev_refs:
        raise CorpusError("--dev_ref_file given without --dev_file")
    vocab_id = vocab_fingerprint(tokenizer)
    request = {
        "settings": {"max_seq_length": max_seq_length, "vocab": vocab_id, "encoding_errors": errors,
                     "alignment": {name: s.alignment for name, s in splits.items()}},
        "inputs": {f"{name} {what} {i + 1}": stages.input_entry(p, stages.file_fingerprint(p))
                   for name, s in splits.items() for what, paths in (("corpus", s.files), ("refs", s.refs))
                   for i, p in enumerate(paths)},
    }
    output_dir = Path(output_dir)
    inputs = [(f"{name} {what}", p) for name, s in splits.items() for what, paths in
              (("corpus file", s.files), ("ref file", s.refs)) for p in paths]
    inputs.append(("--tokenizer", tokenizer_dir))
    if cache_dir is not None:
        cache = Path(cache_dir).resolve()
        if cache == output_dir.resolve() or output_dir.resolve() in cache.parents:
            raise CorpusError(f"--cache_dir {cache_dir} is inside --output_dir {output_dir}: the finished dataset "
                              "replaces that folder; give a cache folder elsewhere")
    claim = stages.claim(stages.DATASET, output_dir, request, inputs=inputs, overwrite=overwrite)
    if claim.state == "done":
        return claim.record | {"reused": True}

    built, stats = {}, {}
    for name, spec in splits.items():
        built[name], stats[name] = _build_split(name, spec, str(tokenizer_dir),
                                                (tokenizer.cls_token_id, tokenizer.sep_token_id), vocab_id,
                                                max_seq_length, num_workers, errors, cache_dir)
    extra = {"splits": stats, "columns": list(COLUMNS), "tokenizer": str(Path(tokenizer_dir).resolve())}
    with atomic_path(output_dir, is_dir=True, replace=True) as tmp:
        DatasetDict(built).save_to_disk(str(tmp))
        record = stages.write_record(stages.DATASET, tmp, request, complete=True, **extra)
    return record | {"reused": False}


def dataset_fingerprint(path: str | os.PathLike) -> str:
    """What a dataset folder is: the settings and input contents it was built from."""
    record = stages.read_record(stages.DATASET, path)
    if record is None:
        raise CorpusError(f"{path} is not a dataset made by pretraining/my_datasets.py (no {MANIFEST})")
    return stages.settings_fingerprint([record["settings"],
                                        {k: v["fingerprint"] for k, v in record["inputs"].items()}])


def load_pretraining_dataset(path: str | os.PathLike) -> DatasetDict:
    """Load a folder made by :func:`build_pretraining_dataset`, checking it is one."""
    path = Path(path)
    record = stages.read_record(stages.DATASET, path)
    if record is None or not record.get("complete"):
        raise CorpusError(f"{path} is not a dataset made by pretraining/my_datasets.py (no {MANIFEST})")
    ds = datasets.load_from_disk(str(path))
    for name, split in ds.items():
        missing = [c for c in COLUMNS if c not in split.column_names]
        if missing:
            raise CorpusError(f"{path}: split {name!r} lacks columns {missing}")
    return ds
