"""Loading BERT tokenizers from local folders, and tokenizing Chinese text fast.

transformers 5 traps handled here (see OFFLINE.md): ``BertTokenizer(vocab_file=...)``
turns every Chinese character into ``[UNK]``, so tokenizers are only built with
``from_pretrained(folder)``; ``save_pretrained`` no longer writes ``vocab.txt``,
so :func:`save_tokenizer` writes it explicitly.

:class:`LineTokenizer` gives exactly the tokens of the Hugging Face fast tokenizer
(``tokenizer(line).tokens()``), 5-10x faster on Chinese text: the Rust BERT
normalizer costs ~4 us per character here. It learns, per character and from the
Hugging Face tokenizer itself, what the normalizer and pre-tokenizer do with it,
and tokenizes lines made of such characters in Python; any line with a character
whose treatment depends on context (multi-character normalisations, combining
marks, added tokens such as a literal ``[SEP]``) goes to the Hugging Face tokenizer.
Equality with Hugging Face is tested on real text and on arbitrary Unicode.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from importlib import resources
from pathlib import Path

from transformers import BertTokenizer, PreTrainedTokenizerBase

from minirbt.textio import CorpusError

VOCAB_NAME = "vocab.txt"
TOKENIZER_CONFIG = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}


def default_vocab_path() -> Path:
    """The 21,128-token bert-base-chinese vocab (RoBERTa-wwm-ext and MiniRBT use it)."""
    return Path(str(resources.files("minirbt") / "assets" / "bert-base-chinese-vocab.txt"))


def save_tokenizer(folder: str | os.PathLike, vocab_file: str | os.PathLike | None = None) -> Path:
    """Write ``vocab.txt`` + ``tokenizer_config.json`` so ``BertTokenizer.from_pretrained`` works."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(vocab_file) if vocab_file else default_vocab_path()
    (folder / VOCAB_NAME).write_bytes(src.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    return folder


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """``BertTokenizer.from_pretrained(folder)`` with errors that say what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CorpusError(
            f"tokenizer folder not found: {folder} (expected a model folder with vocab.txt, "
            "e.g. pretrained_model_path/RoBERTa-wwm-ext; see pretrained_model_path/README.md)"
        )
    if not (folder / VOCAB_NAME).is_file() and not (folder / "tokenizer.json").is_file():
        raise CorpusError(f"tokenizer folder {folder} has no vocab.txt (nor tokenizer.json)")
    tokenizer = BertTokenizer.from_pretrained(str(folder))
    probe = tokenizer("中文", add_special_tokens=False)["input_ids"]
    if tokenizer.unk_token_id is not None and all(i == tokenizer.unk_token_id for i in probe):
        raise CorpusError(f"tokenizer in {folder} maps Chinese characters to [UNK]: not a Chinese BERT vocab")
    return tokenizer


def vocab_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary, to detect teacher/student/dataset mismatches."""
    import hashlib

    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(t for t, _ in items).encode()).hexdigest()[:16]


def is_cjk_char(cp: int) -> bool:
    """BERT's definition of a Chinese character (CJK Unified Ideographs blocks)."""
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


CJK_CLASS = (
    "\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002b73f"
    "\U0002b740-\U0002b81f\U0002b820-\U0002ceaf\uf900-\ufaff\U0002f800-\U0002fa1f"
)
CJK_RUN = re.compile(f"[{CJK_CLASS}]*")

# "Token characters": a line as one character per token. A token that is one CJK
# character stands for itself; every other token becomes a marker that no Chinese
# word contains. This is all the whole-word-mask refs need.
NOT_CJK, MULTI_CJK, HASH_CJK = "\x00", "\x01", "\x02"
_TOKEN_CHAR: dict[str, str] = {}


def token_char(token: str) -> str:
    hit = _TOKEN_CHAR.get(token)
    if hit is None:
        if len(token) == 1 and is_cjk_char(ord(token)):
            hit = token
        elif token and CJK_RUN.fullmatch(token):
            hit = MULTI_CJK  # a multi-character CJK token: callers take a slow, exact path
        elif len(token) == 3 and token[:2] == "##" and is_cjk_char(ord(token[2])):
            hit = HASH_CJK
        else:
            hit = NOT_CJK
        if len(_TOKEN_CHAR) > 2_000_000:
            _TOKEN_CHAR.clear()
        _TOKEN_CHAR[token] = hit
    return hit


def token_chars(tokens: list[str]) -> str:
    """One character per token (see above)."""
    try:
        return "".join(map(_TOKEN_CHAR.__getitem__, tokens))
    except KeyError:
        return "".join(map(token_char, tokens))


# Character classes for the fast path.
_SEP, _DROP, _ALONE, _WORD, _OTHER = range(5)
_FALLBACK = "\x03"  # in a translated line: a character the fast path does not handle
_WORD_RUN = re.compile(f"[^{CJK_CLASS}\\x00 ]+")


class _TranslateTable(dict):
    """``str.translate`` table from a character to its token character(s), filled lazily."""

    def __init__(self, owner: LineTokenizer):
        super().__init__()
        self.owner = owner

    def __missing__(self, cp: int) -> str:
        kind, norm = self.owner._char_class(chr(cp))
        if kind == _ALONE:
            out = token_char(norm if norm in self.owner.vocab else self.owner.unk)
            if out in (MULTI_CJK, HASH_CJK):
                out = _FALLBACK
        elif kind == _WORD:
            out = _FALLBACK if norm in (NOT_CJK, " ", _FALLBACK) or is_cjk_char(ord(norm)) else norm
        elif kind == _SEP:
            out = " "
        elif kind == _DROP:
            out = ""
        else:
            out = _FALLBACK
        self[cp] = out
        return out


class LineTokenizer:
    """Tokens and ids of single lines, identical to the Hugging Face fast tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        spec = json.loads(self.backend.to_str())
        model = spec.get("model") or {}
        self.vocab: dict[str, int] = dict(tokenizer.get_vocab())
        self.unk = model.get("unk_token", "[UNK]")
        self.prefix = model.get("continuing_subword_prefix", "##")
        self.max_chars = model.get("max_input_chars_per_word", 100)
        self.cls, self.sep = tokenizer.cls_token, tokenizer.sep_token
        self.added = [t.content for t in tokenizer.added_tokens_decoder.values()]
        # The fast path replicates a BERT WordPiece pipeline and nothing else.
        self.fast_ok = (
            model.get("type") == "WordPiece"
            and (spec.get("normalizer") or {}).get("type") == "BertNormalizer"
            and (spec.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
        )
        self._cls: dict[str, tuple[int, str]] = {}
        self._words: dict[str, list[str]] = {}
        self._table = _TranslateTable(self)
        self._word_marks: dict[str, str] = {}
        self._added_re = re.compile("|".join(re.escape(a) for a in self.added)) if self.added else None

    def _char_class(self, ch: str) -> tuple[int, str]:
        hit = self._cls.get(ch)
        if hit is not None:
            return hit
        normalize = self.backend.normalizer.normalize_str
        pretok = self.backend.pre_tokenizer.pre_tokenize_str
        norm = normalize(ch)
        core = norm.strip(" ")
        out = (_OTHER, "")
        if norm == "":
            out = (_DROP, "")
        elif core == "":
            if not pretok(norm):
                out = (_SEP, "")
        elif len(core) == 1 and not unicodedata.combining(core) and not unicodedata.combining(ch):
            pieces = [p for p, _ in pretok(normalize("a" + ch + "a"))]
            if pieces == ["a", core, "a"]:
                out = (_ALONE, core)
            elif norm == core and pieces == ["a" + core + "a"]:
                out = (_WORD, core)
        self._cls[ch] = out
        return out

    def _wordpiece(self, word: str) -> list[str]:
        hit = self._words.get(word)
        if hit is not None:
            return hit
        if len(word) > self.max_chars:
            pieces = [self.unk]
        else:
            pieces = []
            start = 0
            while start < len(word):
                end = len(word)
                cur = None
                while start < end:
                    sub = word[start:end] if start == 0 else self.prefix + word[start:end]
                    if sub in self.vocab:
                        cur = sub
                        break
                    end -= 1
                if cur is None:
                    pieces = [self.unk]
                    break
                pieces.append(cur)
                start = end
        if len(self._words) < 200_000:
            self._words[word] = pieces
        return pieces

    def _fast_tokens(self, line: str) -> list[str] | None:
        out: list[str] = []
        word: list[str] = []
        vocab, unk = self.vocab, self.unk
        for ch in line:
            kind, norm = self._cls.get(ch) or self._char_class(ch)
            if kind == _WORD:
                word.append(norm)
            elif kind == _ALONE:
                if word:
                    out.extend(self._wordpiece("".join(word)))
                    word = []
                out.append(norm if norm in vocab else unk)
            elif kind == _SEP:
                if word:
                    out.extend(self._wordpiece("".join(word)))
                    word = []
            elif kind == _OTHER:
                return None
        if word:
            out.extend(self._wordpiece("".join(word)))
        return out

    def tokens(self, lines: list[str], special: bool = True) -> list[list[str]]:
        """Tokens of each line (with ``[CLS]``/``[SEP]`` when ``special``), no truncation."""
        result: list[list[str] | None] = []
        slow: list[int] = []
        for i, line in enumerate(lines):
            toks = None
            if self.fast_ok and not any(a in line for a in self.added):
                toks = self._fast_tokens(line)
                if toks is not None and special:
                    toks = [self.cls, *toks, self.sep]
            if toks is None:
                slow.append(i)
            result.append(toks)
        if slow:
            encs = self.backend.encode_batch([lines[i] for i in slow], add_special_tokens=special)
            for i, enc in zip(slow, encs):
                result[i] = list(enc.tokens)
        return result  # type: ignore[return-value]

    def _marks(self, match: re.Match) -> str:
        word = match.group()
        hit = self._word_marks.get(word)
        if hit is None:
            hit = token_chars(self._wordpiece(word))
            if len(self._word_marks) < 200_000:
                self._word_marks[word] = hit
        return hit

    def token_chars(self, lines: list[str]) -> list[str | list[str]]:
        """Per line, ``token_chars(tokens(line))`` (with ``[CLS]``/``[SEP]``) computed
        without building the tokens, or the token list itself where the line needs the
        Hugging Face tokenizer or holds a multi-character CJK token."""
        out: list[str | list[str]] = []
        slow: list[int] = []
        table, marks, sub = self._table, self._marks, _WORD_RUN.sub
        added = self._added_re
        for i, line in enumerate(lines):
            if self.fast_ok and (added is None or added.search(line) is None):
                t = line.translate(table)
                if _FALLBACK not in t:
                    out.append(NOT_CJK + sub(marks, t).replace(" ", "") + NOT_CJK)
                    continue
            slow.append(i)
            out.append("")
        if slow:
            for i, toks in zip(slow, self.tokens([lines[i] for i in slow])):
                chars = token_chars(toks)
                out[i] = toks if MULTI_CJK in chars else chars
        return out

    def ids(self, lines: list[str]) -> list[list[int]]:
        """Token ids of each line without special tokens, no truncation."""
        vocab = self.vocab
        return [[vocab[t] for t in toks] for toks in self.tokens(lines, special=False)]
