"""What a "line" of a corpus is, and how files are written safely.

One definition, used by every stage (refs, dataset, tests):

* A corpus file is UTF-8. It is split on ``\\n`` only; one trailing ``\\r`` per line
  is dropped, so ``\\r\\n`` files read the same as ``\\n`` files.
* U+2028, U+2029, U+0085, U+000B, U+000C and every other Unicode "line break" are
  ordinary characters *inside* a line (Python's ``str.splitlines`` and the
  ``datasets`` text loader split on them; that is how MiniRBT's refs drifted).
* A final ``\\n`` ends the last line; it does not start an empty one.
* Blank lines are lines: stage 1 writes ``[]`` for them and stage 2 tokenizes them
  to zero tokens, so the ref file always has exactly one line per corpus line.
* Invalid UTF-8 is an error naming the file and line (``errors="strict"``), or,
  when asked for (``errors="replace"``), becomes U+FFFD, which the BERT tokenizer
  drops like any other control character. Both stages take the same setting.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

READ_BLOCK = 1 << 22  # 4 MiB: bounded memory whatever the file size


class CorpusError(ValueError):
    """Bad input: the message names the file (and line) and what to do."""


def iter_lines(path: str | os.PathLike, errors: str = "strict") -> Iterator[str]:
    """Yield the lines of ``path`` as defined above, streaming in 4 MiB blocks."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', not {errors!r}")
    path = Path(path)
    lineno = 0
    with open(path, "rb") as f:
        rest = b""
        while True:
            block = f.read(READ_BLOCK)
            if not block:
                break
            parts = (rest + block).split(b"\n")
            rest = parts.pop()
            for raw in parts:
                lineno += 1
                yield _decode(raw, path, lineno, errors)
        if rest:
            lineno += 1
            yield _decode(rest, path, lineno, errors)


def _decode(raw: bytes, path: Path, lineno: int, errors: str) -> str:
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path}:{lineno}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}). "
            "Fix the file, or pass --encoding_errors replace to read such bytes as U+FFFD "
            "(use the same setting for run_chinese_ref.py and my_datasets.py)."
        ) from None


def count_lines(path: str | os.PathLike) -> int:
    """Number of lines ``iter_lines`` yields, without decoding (fast, bounded memory)."""
    n = 0
    last = b""
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            n += block.count(b"\n")
            last = block
    if last and not last.endswith(b"\n"):
        n += 1
    return n


def is_blank(line: str) -> bool:
    """Blank as MiniRBT's reference script saw it (``str.isspace`` or empty)."""
    return not line or line.isspace()


def require_file(path: str | os.PathLike, what: str, allow_empty: bool = False) -> Path:
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{what} not found: {path}")
    if not path.is_file():
        raise CorpusError(f"{what} is not a file: {path}")
    if not allow_empty and path.stat().st_size == 0:
        raise CorpusError(f"{what} is empty: {path}")
    return path


def list_corpus_files(folder: str | os.PathLike) -> list[Path]:
    """Regular, non-hidden files of a folder in name order (what a corpus folder holds)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CorpusError(f"no corpus files in folder {folder}")
    return files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; move it into place only on success.

    A killed or failing run leaves at most a ``.tmp-*`` name behind, never
    something that looks like a finished output. An existing ``final`` is replaced
    only with ``replace=True`` (callers claim their output first, see
    :mod:`minirbt.stages`). The result gets the permissions of a file or folder
    created normally (the umask), not the private ones of a temporary name.
    """
    final = Path(final)
    if not replace and (final.exists() or final.is_symlink()):
        raise CorpusError(f"{final} exists: refusing to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        mask = _umask()
        if is_dir:
            _fsync_tree(tmp)
            os.chmod(tmp, 0o777 & ~mask)
            old = None
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~mask)
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
