"""Whole-word-mask reference files ("refs"): stage 1 of the recipe.

The ref of a line is the sorted list of token positions (``[CLS]`` = 0) whose token
is a non-first character of a Chinese word. Exactly the algorithm of the Hugging
Face / MiniRBT ``run_chinese_ref.py`` (kept below as :func:`reference_ref` to test
against):

1. the segmenter's words of the line that are longer than one character and made
   only of CJK characters form a *set*;
2. scanning the BERT tokens left to right, at each token that is CJK the longest
   run of following tokens whose concatenation is in the set is a word (greedy,
   longest first); its tokens after the first are marked;
3. marked tokens that are a single CJK character are the ref (as are tokens the
   tokenizer itself wrote as ``##`` + one CJK character).

Unlike the reference script, lines are never truncated: a line longer than 512
tokens gets its whole ref, and stage 2 cuts it into chunks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ahocorasick
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from minirbt.segmentation import Segmenter, make_segmenter
from minirbt.textio import CorpusError, atomic_path, count_lines, iter_lines, require_file
from minirbt.tokenization import (
    CJK_CLASS,
    CJK_RUN,
    HASH_CJK,
    MULTI_CJK,
    NOT_CJK,
    LineTokenizer,
    is_cjk_char,
    load_tokenizer,
    token_chars,
)


def is_cjk_word(word: str) -> bool:
    """True when every character is CJK (the empty string counts, as in the reference)."""
    return CJK_RUN.fullmatch(word) is not None


# A multi-character, all-CJK word between two NULs (the separator of the joined words).
_MASKABLE_WORD = re.compile(f"\x00([{CJK_CLASS}]{{2,}})(?=\x00)")


def chinese_words(words: Iterable[str]) -> set[str]:
    """The words that can be whole-word masked: longer than one character, all CJK."""
    words = words if isinstance(words, list) else list(words)
    joined = "\x00" + "\x00".join(words) + "\x00"
    if joined.count("\x00") == len(words) + 1:  # one regex pass in C instead of a test per word
        return set(_MASKABLE_WORD.findall(joined))
    return {w for w in words if len(w) > 1 and CJK_RUN.fullmatch(w)}  # a word holds a NUL


def format_refs(refs: list[list[int]]) -> str:
    """Ref lines as written to ref files: ``[2, 4, 6]`` (JSON; ``str`` of an int list is the same text)."""
    return "".join(f"{r}\n" for r in refs)


# The characters of token-character strings that are not CJK (see minirbt.tokenization).
_MARKERS = re.compile(f"[{NOT_CJK}{MULTI_CJK}{HASH_CJK}]")


def whole_word_ref(tokens: list[str] | str, words: Iterable[str]) -> list[int]:
    """Ref positions of one line: the same result as :func:`reference_ref`, ~4x faster.

    ``tokens`` is the token list or its token characters (one character per token,
    see :func:`minirbt.tokenization.token_chars`). The reference's scan - at each
    token, the longest word of the set that starts there, then on after it - is
    leftmost-longest multi-pattern matching over the matches an Aho-Corasick automaton
    of the line's words finds in C (``pyahocorasick``; checked against the reference
    on random text in the tests). In token characters every non-CJK token
    is a marker character, so a word matches only if it is all CJK: the filter of
    the reference comes for free, unless a word itself holds a marker character
    (a NUL in the text), which takes the explicit filter. A tokenizer that emits
    multi-character CJK tokens takes the reference path.
    """
    line = tokens if isinstance(tokens, str) else token_chars(tokens)
    if MULTI_CJK in line:
        return reference_ref(list(tokens), words)
    words = words if isinstance(words, list) else list(words)
    if _MARKERS.search("".join(words)):
        words = list(chinese_words(words))
    automaton = ahocorasick.Automaton(ahocorasick.STORE_LENGTH)
    add = automaton.add_word
    for word in words:
        if len(word) > 1:  # one-character words mark nothing
            add(word)
    ref: list[int] = []
    if len(automaton):
        automaton.make_automaton()
        # leftmost-longest from all matches: pyahocorasick's own iter_long misses a shorter word after two longer
        # candidates that fail (line 中中中国, words 中中国国 中中中国国 中国: it finds nothing)
        longest: dict[int, int] = {}  # start -> length of the longest word starting there
        for end, length in automaton.iter(line):
            start = end - length + 1
            if length > longest.get(start, 0):
                longest[start] = length
        covered = 0
        for start in sorted(longest):
            if start >= covered:
                ref += range(start + 1, start + longest[start])  # every character after the word's first
                covered = start + longest[start]
    if HASH_CJK in line:
        # Tokens the tokenizer itself wrote as ## + one CJK character count too
        # (never produced with BERT's Chinese handling; kept for exactness).
        ref = sorted(set(ref) | {i for i, c in enumerate(line) if c == HASH_CJK})
    return ref


def reference_ref(tokens: list[str], words: Iterable[str]) -> list[int]:
    """The reference algorithm, transcribed from the Hugging Face script (for tests/bench)."""
    chinese_word_set = {w for w in set(words) if len(w) > 1 and is_cjk_word(w)}
    bert_word = list(tokens)
    if chinese_word_set:
        max_word_len = max(len(w) for w in chinese_word_set)
        start, end = 0, len(bert_word)
        while start < end:
            single_word = True
            if is_cjk_word(bert_word[start]):
                length = min(end - start, max_word_len)
                for i in range(length, 1, -1):
                    whole_word = "".join(bert_word[start : start + i])
                    if whole_word in chinese_word_set:
                        for j in range(start + 1, start + i):
                            bert_word[j] = "##" + bert_word[j]
                        start = start + i
                        single_word = False
                        break
            if single_word:
                start += 1
    ref_id = []
    for i, token in enumerate(bert_word):
        if token[:2] == "##":
            clean_token = token[2:]
            if len(clean_token) == 1 and is_cjk_char(ord(clean_token)):
                ref_id.append(i)
    return ref_id


def reference_prepare_ref(lines: list[str], segment: Callable[[list[str]], list[list[str]]],
                          tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """The Hugging Face / MiniRBT script's ``prepare_ref``, step by step (for tests/bench).

    Segmentation in batches of 100, the tokenizer on batches of 100 with truncation
    at 512, ids turned back into tokens one at a time, ``##`` marking in Python.
    ``lines`` are the stripped, non-blank lines, as that script feeds them.
    """
    words = []
    for i in range(0, len(lines), 100):
        words.extend(segment(lines[i : i + 100]))
    ids = []
    for i in range(0, len(lines), 100):
        ids.extend(tokenizer(lines[i : i + 100], add_special_tokens=True, truncation=True, max_length=512)["input_ids"])
    return [reference_ref([tokenizer.convert_ids_to_tokens(t) for t in line_ids], line_words)
            for line_ids, line_words in zip(ids, words)]


class RefBuilder:
    """Segment + tokenize + ref, for batches of lines."""

    def __init__(self, line_tokenizer: LineTokenizer, segmenter: Segmenter, memo_size: int = 50_000):
        self.line_tokenizer = line_tokenizer
        self.segmenter = segmenter
        # Identical lines (frequent in web corpora) get identical refs: remember recent ones.
        self._memo: dict[str, list[int]] = {}
        self.memo_size = memo_size
        self.segmented = 0  # lines handed to the segmenter so far

    def refs(self, lines: list[str]) -> list[list[int]]:
        # As the reference script: the segmenter and the tokenizer see the stripped line.
        stripped = [line.strip() for line in lines]
        out: list[list[int] | None] = [self._memo.get(s) if s else [] for s in stripped]
        todo_idx = [i for i, r in enumerate(out) if r is None]
        todo = list(dict.fromkeys(stripped[i] for i in todo_idx))
        if todo:
            fresh = dict(zip(todo, self.distinct_refs(todo)))
            if len(self._memo) + len(fresh) > self.memo_size:
                self._memo.clear()
            self._memo.update(fresh)
            for i in todo_idx:
                out[i] = fresh[stripped[i]]
        return out  # type: ignore[return-value]

    def distinct_refs(self, lines: list[str]) -> list[list[int]]:
        """Refs of lines that are already stripped, non-blank and distinct (no memo)."""
        self.segmented += len(lines)
        words = self.segmenter.segment(lines)
        if len(words) != len(lines):
            raise RuntimeError(f"segmenter returned {len(words)} results for {len(lines)} lines")
        tokens = self.line_tokenizer.token_chars(lines)
        return [whole_word_ref(t, w) for t, w in zip(tokens, words)]


# ---------------------------------------------------------------- files, in parallel


@dataclass(frozen=True)
class RefSpec:
    """What a worker process needs to build its own :class:`RefBuilder`."""

    tokenizer: str
    segmenter: str = "jieba"
    ltp_model: str | None = None
    user_dict: str | None = None
    device: str = "cpu"

    def build(self, threads: bool = True) -> RefBuilder:
        """``threads=False`` in worker processes: the segmenter runs on the calling thread."""
        return RefBuilder(LineTokenizer(load_tokenizer(self.tokenizer)),
                          make_segmenter(self.segmenter, self.ltp_model, self.user_dict, device=self.device,
                                         threads=threads))


_WORKER_BUILDER: RefBuilder | None = None


def _worker_init(spec: RefSpec) -> None:
    global _WORKER_BUILDER
    os.environ["RAYON_NUM_THREADS"] = "1"  # should any Rust pool start anyway: one thread per worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_BUILDER = spec.build(threads=False)


def _work(lines: list[str]) -> list[str]:
    """Ref lines of distinct, stripped, non-blank lines (the parent sends nothing else)."""
    assert _WORKER_BUILDER is not None
    return [f"{r}\n" for r in _WORKER_BUILDER.distinct_refs(lines)]


class _Job:
    """Distinct stripped lines sent to a worker, and (once fetched) their ref lines."""

    def __init__(self, lines: list[str], result):
        self.lines = lines
        self._result = result
        self._refs: dict[str, str] | None = None

    def refs(self) -> dict[str, str]:
        if self._refs is None:
            self._refs = dict(zip(self.lines, self._result.get()))
        return self._refs


@dataclass
class RefStats:
    lines: int
    seconds: float
    segmented: int  # distinct non-blank lines that were segmented (repeats are looked up)

    @property
    def lines_per_s(self) -> float:
        return self.lines / max(self.seconds, 1e-9)


def _blocks(path: Path, block_lines: int, errors: str, total: int | None = None,
            workers: int = 1) -> Iterator[list[str]]:
    """Blocks of ``block_lines`` lines; with ``total`` known, smaller ones towards the end
    (a quarter of what each worker has left), so that workers finish together."""
    block: list[str] = []
    size = block_lines
    remaining = total
    for line in iter_lines(path, errors=errors):
        if not block and remaining is not None:
            size = min(block_lines, max(64, remaining // (4 * workers)))
        block.append(line)
        if len(block) == size:
            yield block
            if remaining is not None:
                remaining -= size
            block = []
    if block:
        yield block


class RefWriter:
    """Writes ref files, one line per corpus line, with a pool of worker processes.

    Workers start from a clean fork server (never by forking a process whose
    threads - LTP's and the tokenizer's Rust pools, torch's - might hold locks),
    each loading its own tokenizer and segmenter once; the pool serves every file.
    At most two blocks per worker are in flight, so memory stays bounded whatever
    the corpus size. A line whose stripped text was already sent (among the last
    ``memo_size`` distinct lines) is not sent again: its ref is looked up here.
    """

    def __init__(self, spec: RefSpec | RefBuilder, num_workers: int = 1, block_lines: int = 2000,
                 errors: str = "strict", progress: bool = True, memo_size: int = 100_000):
        if num_workers > 1 and not isinstance(spec, RefSpec):
            raise ValueError("worker processes need a RefSpec to build their own RefBuilder")
        self.spec = spec
        self.num_workers = num_workers
        self.block_lines = block_lines
        self.errors = errors
        self.progress = progress
        self.memo_size = memo_size
        self._pool = None
        self._builder: RefBuilder | None = None

    def __enter__(self) -> RefWriter:
        if self.num_workers > 1:
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            ctx = mp.get_context(method)
            if method == "forkserver":
                ctx.set_forkserver_preload(["minirbt.refs", "minirbt.segmentation"])
            self._pool = ctx.Pool(self.num_workers, initializer=_worker_init, initargs=(self.spec,))
        else:
            self._builder = self.spec.build() if isinstance(self.spec, RefSpec) else self.spec
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate() if exc[0] is not None else self._pool.close()
            self._pool.join()
            self._pool = None

    def write(self, input_path: str | os.PathLike, output_path: str | os.PathLike) -> RefStats:
        """Write the ref file of one corpus file (atomically: complete or absent)."""
        input_path = require_file(input_path, "corpus file", allow_empty=True)
        total = count_lines(input_path)
        t0 = time.perf_counter()
        written = segmented = 0
        bar = tqdm(total=total, unit=" lines", desc=f"refs {input_path.name}", disable=not self.progress,
                   dynamic_ncols=True, smoothing=0.1)
        with atomic_path(output_path, replace=True) as tmp, open(tmp, "w", encoding="utf-8") as out:
            blocks = _blocks(input_path, self.block_lines, self.errors, total, max(1, self.num_workers))
            if self._pool is None:
                assert self._builder is not None, "use RefWriter as a context manager"
                before = self._builder.segmented
                for block in blocks:
                    out.write(format_refs(self._builder.refs(block)))
                    written += len(block)
                    bar.update(len(block))
                segmented = self._builder.segmented - before
            else:
                # Workers only ever see distinct lines that no earlier block held: repeated
                # lines (common in web corpora; OCNLI repeats each premise 3x) are looked up
                # here, so no worker segments a line another worker already did.
                known: dict[str, str] = {}  # stripped line -> ref line, the most recent ones
                inflight: dict[str, _Job] = {}  # stripped line -> the job computing it
                pending: deque = deque()
                for block in blocks:
                    stripped = [line.strip() for line in block]
                    sources: list[str | _Job | None] = []
                    new: dict[str, None] = {}
                    for s in stripped:
                        src = (known.get(s) or inflight.get(s)) if s else "[]\n"
                        if src is None:
                            new[s] = None
                        sources.append(src)
                    job = None
                    if new:
                        lines = list(new)
                        job = _Job(lines, self._pool.apply_async(_work, (lines,)))
                        inflight.update(dict.fromkeys(lines, job))
                        segmented += len(lines)
                    pending.append((stripped, [job if src is None else src for src in sources], job))
                    while len(pending) >= 2 * self.num_workers:
                        written += self._write_block(out, pending.popleft(), known, inflight, bar)
                while pending:
                    written += self._write_block(out, pending.popleft(), known, inflight, bar)
            out.flush()
            if written != total:
                raise CorpusError(f"{input_path}: read {written} lines but the file has {total}; was it modified?")
        bar.close()
        return RefStats(written, time.perf_counter() - t0, segmented)


    def _write_block(self, out, entry, known: dict[str, str], inflight: dict[str, _Job], bar) -> int:
        stripped, sources, job = entry
        out.write("".join(src if isinstance(src, str) else src.refs()[s] for s, src in zip(stripped, sources)))
        if job is not None:
            fresh = job.refs()
            for s in fresh:
                inflight.pop(s, None)
            if len(known) + len(fresh) > self.memo_size:
                known.clear()  # bounded memory; later blocks hold their values already
            known.update(fresh)
        bar.update(len(stripped))
        return len(stripped)


def write_ref_file(spec: RefSpec | RefBuilder, input_path: str | os.PathLike, output_path: str | os.PathLike,
                   num_workers: int = 1, block_lines: int = 2000, errors: str = "strict",
                   progress: bool = True) -> RefStats:
    """One file, start to end (see :class:`RefWriter`)."""
    with RefWriter(spec, num_workers, block_lines, errors, progress) as writer:
        return writer.write(input_path, output_path)


def ref_request(spec: RefSpec, errors: str, corpus_files: list[Path]) -> dict:
    """What determines a ref file (see :mod:`minirbt.stages`): the vocab, the segmenter and its model or
    dictionary, the reading of invalid UTF-8, and the corpus files' contents."""
    from minirbt import stages
    from minirbt.tokenization import vocab_fingerprint

    settings = {"vocab": vocab_fingerprint(load_tokenizer(spec.tokenizer)), "segmenter": spec.segmenter,
                "encoding_errors": errors,
                "ltp_model": stages.folder_fingerprint(spec.ltp_model) if spec.ltp_model else None,
                "user_dict": stages.file_fingerprint(spec.user_dict) if spec.user_dict else None}
    inputs = {f"corpus {f.name}": stages.input_entry(f, stages.file_fingerprint(f)) for f in corpus_files}
    return {"settings": settings, "inputs": inputs}


def ref_name(corpus_file: Path) -> str:
    """MiniRBT's naming: ``<stem>_ref.txt``."""
    return f"{corpus_file.stem}_ref.txt"
