"""The stage contract: what each stage writes, how a finished output is recognised,
which settings produced it, and what a new request may do with it.

Every output of the project carries a *record* (a small JSON file): its kind, the
settings that determine its content, the fingerprints of its inputs, and whether it
is complete. A folder output keeps its record inside (``minirbt_dataset.json``,
``minirbt_run.json``, ...); a single-file output (a ref file) beside it, as a hidden
``.<name>.minirbt.json``. Before writing, every command *claims* its output:

* the path must be absent, an empty folder, or an output of the same kind that this
  project wrote (it has the record). Anything else is refused: an input of the same
  command or a folder holding one, the current directory, an existing file, a folder
  of someone else's files (a teacher, a corpus, a home directory);
* an output of the same kind made with the same settings from the same inputs is
  *done* (the command says so and does nothing) or, for a training run killed midway,
  *resumable* with ``--resume``;
* one made with other settings is refused with every differing setting, old and new,
  unless ``--overwrite_output`` asks to replace it (inputs are never replaced);
  ``--accept_changed NAME`` lets a resumed run continue under a changed setting where
  that is meaningful (e.g. more ``max_steps``).

Settings that cannot change the result (logging, evaluation cadence, workers, device,
paths of inputs whose content is the same) are not part of the record's comparison.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from minirbt import __version__
from minirbt.textio import CorpusError, atomic_path


@dataclass(frozen=True)
class Kind:
    """One kind of output: its name in messages, its record file, folder or file, and resumability."""

    name: str
    record: str  # file name of the record (inside a folder output; beside a file output as .<name>.<record>)
    folder: bool = True
    resumable: bool = False  # an unfinished output can be continued (--resume) rather than redone

    def record_path(self, path: Path) -> Path:
        return path / self.record if self.folder else path.with_name(f".{path.name}.{self.record}")


REFS_FILE = Kind("ref file", "minirbt.json", folder=False)
REFS_FOLDER = Kind("folder of ref files", "minirbt_refs.json")
DATASET = Kind("dataset", "minirbt_dataset.json")
MODEL = Kind("model folder", "minirbt_model.json")
TRAINING_RUN = Kind("training run", "minirbt_run.json", resumable=True)
FINETUNE_RUN = Kind("fine-tuning run", "minirbt_finetune.json", resumable=True)
MRC_RUN = Kind("reading-comprehension fine-tuning run", "minirbt_finetune.json", resumable=True)
NER_RUN = Kind("NER fine-tuning run", "minirbt_finetune.json", resumable=True)
LTP_MODEL = Kind("LTP segmenter folder", "minirbt_ltp.json")
DEMO_RUN = Kind("demo run", "pipeline_settings.json", resumable=True)
EXPORT = Kind("ONNX export folder", "minirbt_export.json")
NER_DATA = Kind("NER data folder", "minirbt_ner_data.json")
KINDS = (REFS_FOLDER, DATASET, MODEL, TRAINING_RUN, FINETUNE_RUN, LTP_MODEL, DEMO_RUN, EXPORT, NER_DATA)

# Files a finished training run holds at its top (the final student) and its summary.
TRAINING_SUMMARY = "minirbt_training.json"
FINETUNE_RESULTS = "results.json"
OVERWRITE_FLAG = "--overwrite_output"


# ------------------------------------------------------------------ fingerprints
_HASHES: dict[tuple, str] = {}


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (cached per process by path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def folder_fingerprint(folder: str | os.PathLike, names: Iterable[str] | None = None) -> str:
    """One hash over the named files of a folder (default: its regular, non-hidden top-level files)."""
    folder = Path(folder)
    if names is None:
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    h = hashlib.sha256()
    for name in names:
        if (folder / name).is_file():
            h.update(f"{name}\0{file_fingerprint(folder / name)}\0".encode())
    return h.hexdigest()


MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt")


def model_fingerprint(folder: str | os.PathLike) -> str:
    """What a model folder is: its config, weights and vocab (not logs, checkpoints or records)."""
    return folder_fingerprint(folder, MODEL_FILES)


def settings_fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------ records
def read_record(kind: Kind, path: str | os.PathLike) -> dict | None:
    """The record of an output of ``kind`` at ``path``, or None when there is none (or it is unreadable)."""
    rec = kind.record_path(Path(path))
    if not rec.is_file():
        return None
    try:
        data = json.loads(rec.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == kind.name else None


def write_record(kind: Kind, path: str | os.PathLike, request: dict, complete: bool, **extra) -> dict:
    """Write (atomically) the record of ``path``: the request it was made for, and whether it is complete."""
    record = {"kind": kind.name, "minirbt_version": __version__, "settings": request.get("settings", {}),
              "inputs": request.get("inputs", {}), "complete": complete, **extra}
    target = kind.record_path(Path(path))
    with atomic_path(target, replace=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return record


def mark_complete(kind: Kind, path: str | os.PathLike, **extra) -> dict:
    record = read_record(kind, path)
    if record is None:
        raise CorpusError(f"{path}: its record ({kind.record}) disappeared while the stage ran")
    record.update(extra, complete=True)
    with atomic_path(kind.record_path(Path(path)), replace=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return record


def differences(old: dict, request: dict) -> list[tuple[str, object, object]]:
    """(name, recorded, requested) for every setting or input fingerprint that differs."""
    out = []
    for section in ("settings", "inputs"):
        a, b = old.get(section, {}) or {}, json.loads(json.dumps(request.get(section, {}), default=str))
        for key in sorted(set(a) | set(b)):
            va, vb = a.get(key, "(not set)"), b.get(key, "(not set)")
            if section == "inputs":  # an input is its content; the path may change
                va = va.get("fingerprint") if isinstance(va, dict) else va
                vb = vb.get("fingerprint") if isinstance(vb, dict) else vb
            if va != vb:
                out.append((key if section == "settings" else f"{key} (content)", va, vb))
    return out


def input_entry(path: str | os.PathLike, fingerprint: str) -> dict:
    return {"path": str(Path(path).resolve()), "fingerprint": fingerprint}


# ------------------------------------------------------------------ claiming an output
@dataclass
class Claim:
    """What a command may do with its output path.

    ``state``: ``new`` (absent or an empty folder: write it), ``done`` (complete, same request: do nothing),
    ``resume`` (unfinished, same request: continue), ``replace`` (ours, to be replaced: --overwrite_output, or
    an unfinished atomic output)."""

    state: str
    path: Path
    record: dict | None = None
    accepted: tuple[tuple[str, object, object], ...] = ()


def _short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


def _refuse_input_clash(flag: str, path: Path, inputs: Sequence[tuple[str, str | os.PathLike | None]]) -> None:
    real = path.resolve()
    if real == Path.cwd().resolve():
        raise CorpusError(f"{flag} {path} is the current directory: give a new or empty folder for the output")
    for in_flag, in_path in inputs:
        if in_path is None:
            continue
        src = Path(in_path).resolve()
        if real == src:
            raise CorpusError(f"{flag} {path} is the {in_flag} input: an output never replaces an input; "
                              f"give another path")
        if real in src.parents:
            raise CorpusError(f"{flag} {path} contains the {in_flag} input {in_path}: an output never replaces "
                              f"an input; give another path")


def describe_foreign(folder: Path) -> str:
    """What a non-empty folder without our record looks like, for the refusal message."""
    for kind in KINDS:
        if (folder / kind.record).is_file():
            return f"a {kind.name} (it has {kind.record})"
    if (folder / "config.json").is_file():
        return "a model folder this command did not write (it has config.json)"
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"files this project did not write ({shown})"


def claim(kind: Kind, path: str | os.PathLike, request: dict, *, flag: str = "--output_dir",
          inputs: Sequence[tuple[str, str | os.PathLike | None]] = (), overwrite: bool = False,
          resume: bool = False, accept_changed: Iterable[str] = (), acceptable: Iterable[str] = (),
          has_progress: Callable[[Path], bool] | None = None) -> Claim:
    """Decide what a command may do with its output ``path`` (see the module docstring); refuse otherwise.

    ``request``: ``{"settings": {...}, "inputs": {name: input_entry(...)}}``; ``inputs``: (flag, path) of the
    command's inputs, never to be replaced; ``acceptable``: settings ``--accept_changed`` may name on resume;
    ``has_progress``: for a resumable kind, whether an unfinished output holds anything worth keeping (an
    unfinished run without a checkpoint is simply started again)."""
    path = Path(path)
    _refuse_input_clash(flag, path, inputs)
    if not path.exists():
        if path.is_symlink():
            raise CorpusError(f"{flag} {path} is a broken symbolic link: give another path")
        return Claim("new", path)
    if kind.folder:
        if not path.is_dir():
            raise CorpusError(f"{flag} {path} is an existing file, not a folder: give a new or empty folder")
        if not any(path.iterdir()):
            return Claim("new", path)
    elif path.is_dir():
        raise CorpusError(f"{flag} {path} is a folder: give a file name for the {kind.name}")
    old = read_record(kind, path)
    if old is None:
        what = describe_foreign(path) if kind.folder else "a file this project did not write"
        raise CorpusError(f"{flag} {path} holds {what}: outputs go to a new path, an empty folder, or an "
                          f"earlier {kind.name} of this project; give another path")
    diffs = differences(old, request)
    accept = set(accept_changed)
    unknown = accept - set(acceptable)
    if unknown:
        raise CorpusError(f"--accept_changed {' '.join(sorted(unknown))}: only "
                          f"{', '.join(sorted(acceptable)) or 'nothing'} may change in a resumed {kind.name}")
    if overwrite:
        return Claim("replace", path, old)
    if not old.get("complete") and (not kind.resumable or (has_progress is not None and not has_progress(path))):
        return Claim("replace", path, old)  # an unfinished output that kept nothing (e.g. no checkpoint yet)
    blocking = [d for d in diffs if not (resume and d[0] in accept)]
    if blocking:
        listed = "; ".join(f"{name}: {_short(a)} -> {_short(b)}" for name, a, b in blocking)
        hint = f"use another {flag}, or {OVERWRITE_FLAG} to replace it"
        changeable = [name for name, _, _ in blocking if name in set(acceptable)]
        if changeable and kind.resumable:
            hint += (f"; to continue it under the new value, --resume --accept_changed {' '.join(changeable)}"
                     if len(changeable) == len(blocking) else "")
        raise CorpusError(f"{flag} {path} holds a {kind.name} made with other settings ({listed}): {hint}")
    accepted = tuple(d for d in diffs if d[0] in accept)
    if old.get("complete") and not accepted:
        return Claim("done", path, old)
    if not resume:
        raise CorpusError(f"{flag} {path} holds an unfinished {kind.name} with these settings: add --resume to "
                          f"continue it, or {OVERWRITE_FLAG} to start it again")
    return Claim("resume", path, old, accepted)


def clear_output(kind: Kind, path: Path, names: Iterable[str]) -> None:
    """Remove a replaced output's own files (named; never anything else in the folder), record last."""
    for name in names:
        for p in path.glob(name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    rec = kind.record_path(path)
    if rec.exists():
        rec.unlink()


def wait_for(kind: Kind, path: str | os.PathLike, timeout: float, poll: float = 5.0) -> dict:
    """Block until ``path`` holds a complete output of ``kind`` (another node writes it); its record."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        record = read_record(kind, path)
        if record is not None and record.get("complete"):
            return record
        if time.monotonic() > deadline:
            raise CorpusError(f"{path}: no complete {kind.name} after {timeout:g} s: is it on a filesystem every "
                              "node sees, and did node 0 build it?")
        time.sleep(poll)


def main(argv: list[str] | None = None) -> None:
    """``python -m minirbt.stages wait KIND PATH [--timeout S]``: used by distill.sh on nodes other than 0."""
    import argparse

    from minirbt.cli import run

    def _main() -> None:
        ap = argparse.ArgumentParser(prog="python -m minirbt.stages", description=main.__doc__)
        sub = ap.add_subparsers(dest="command", required=True)
        w = sub.add_parser("wait", help="wait until PATH holds a complete output of KIND")
        w.add_argument("kind", choices=[k.name for k in (*KINDS, REFS_FILE, MRC_RUN, NER_RUN)])
        w.add_argument("path")
        w.add_argument("--timeout", type=float, default=86400.0)
        args = ap.parse_args(argv)
        kind = next(k for k in (*KINDS, REFS_FILE, MRC_RUN, NER_RUN) if k.name == args.kind)
        wait_for(kind, args.path, args.timeout)
        print(f"{args.path}: complete")

    run(_main)


if __name__ == "__main__":
    main()
