"""Vocabulary pruning (``scripts/prune_vocab.py``): keep the tokens a corpus uses, drop the rest.

TextPruner's idea: most of bert-base-chinese's 21,128 tokens never occur in one
domain, yet for a MiniRBT-H256 student the embedding matrix is about half of the
weights. The pruned folder keeps the special tokens and every token seen at least
``min_count`` times in the corpus, in their original order; it slices the word
embedding rows and, for an MLM head, the tied decoder and its bias; ``vocab.txt``
lists the kept tokens, so ``BertTokenizer`` and the model agree.

Why texts of kept tokens give identical outputs: WordPiece takes the longest
vocabulary match at each position; a kept token is still the longest match in
a subset of the vocabulary, so such a text tokenizes to the same tokens, and each
kept row is copied unchanged. A character the corpus never had becomes ``[UNK]``;
a word piece that was dropped makes WordPiece re-split that word over the kept
pieces (or give ``[UNK]`` for the word), as it does for any word outside a
vocabulary.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minirbt import stages
from minirbt.textio import CorpusError, atomic_path, iter_lines, list_corpus_files

# State-dict entries indexed by token id (the decoder ones are tied to the embeddings in BERT's MLM head)
VOCAB_ROWS = ("embeddings.word_embeddings.weight", "cls.predictions.bias", "cls.predictions.decoder.weight",
              "cls.predictions.decoder.bias")
TOKENIZE_BATCH = 1000


def count_corpus(corpus: str | Path, tokenizer) -> tuple[Counter, dict]:
    """Token-id counts of a text file, a folder of text files, or a dataset folder of my_datasets.py (its
    input_ids, which must come from the same vocabulary); and what was read."""
    from minirbt.tokenization import vocab_fingerprint

    path = Path(corpus)
    if not path.exists():
        raise CorpusError(f"--corpus not found: {path}")
    counts: Counter = Counter()
    record = stages.read_record(stages.DATASET, path) if path.is_dir() else None
    if record is not None:
        from minirbt.data import load_pretraining_dataset

        if record["settings"].get("vocab") != vocab_fingerprint(tokenizer):
            raise CorpusError(f"--corpus {path} was tokenized with another vocabulary than --model's: its token "
                              f"ids mean other tokens; give the text files instead")
        ds = load_pretraining_dataset(path)
        sequences = 0
        for split in ds.values():
            for start in tqdm(range(0, len(split), 4096), desc=f"counting {path.name}", leave=False):
                ids = np.concatenate(split[start : start + 4096]["input_ids"])
                counts.update(dict(zip(*np.unique(ids, return_counts=True))))
            sequences += len(split)
        return counts, {"corpus": str(path), "kind": "dataset", "sequences": sequences}
    files = list_corpus_files(path) if path.is_dir() else [path]
    lines = 0
    for f in files:
        batch: list[str] = []
        for line in tqdm(iter_lines(f), desc=f"counting {f.name}", leave=False):
            if line.strip():
                batch.append(line)
            if len(batch) == TOKENIZE_BATCH:
                lines += _count(batch, tokenizer, counts)
                batch = []
        lines += _count(batch, tokenizer, counts)
    return counts, {"corpus": str(path), "kind": "text", "files": len(files), "lines": lines}


def _count(lines: list[str], tokenizer, counts: Counter) -> int:
    if lines:
        for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    return len(lines)


def kept_ids(counts: Counter, tokenizer, min_count: int = 1) -> list[int]:
    """The special tokens and every token seen at least ``min_count`` times, in vocabulary order."""
    special = set(tokenizer.all_special_ids)
    seen = {int(i) for i, n in counts.items() if n >= min_count and int(i) not in special}
    if not seen:  # [UNK] is a special token: a corpus of unknown characters leaves nothing
        raise CorpusError(f"the corpus shares no token with the vocabulary (at --min_count {min_count}: every "
                          f"token it has is [UNK] or rarer): is it the text of this model's language and "
                          f"vocabulary?")
    return sorted(special | seen)


def prune_state(state: dict[str, torch.Tensor], keep: list[int], vocab_size: int) -> dict[str, torch.Tensor]:
    """The state dict with the token-indexed rows of ``keep`` only (everything else as it is)."""
    index = torch.tensor(keep)
    out = {}
    for key, t in state.items():
        if key.endswith(VOCAB_ROWS) and t.shape[0] == vocab_size:
            out[key] = t.index_select(0, index).clone()
        else:
            out[key] = t
    return out


def prune_model(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """A model of the same class and config with ``vocab_size = len(keep)`` and the kept rows."""
    config = type(model.config).from_dict(model.config.to_dict())
    old = config.vocab_size
    config.vocab_size = len(keep)
    if config.pad_token_id is not None:
        if config.pad_token_id not in keep:
            raise CorpusError(f"the padding token id {config.pad_token_id} is not among the kept tokens")
        config.pad_token_id = keep.index(config.pad_token_id)
    kw = {"add_pooling_layer": any(k.startswith("pooler.") for k in model.state_dict())} \
        if type(model).__name__ == "BertModel" else {}
    pruned = type(model)(config, **kw)
    pruned.load_state_dict(prune_state(model.state_dict(), keep, old))
    return pruned.eval()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))


def prune_folder(model: str, corpus: str, output: str, min_count: int = 1, overwrite: bool = False) -> dict:
    """Prune ``model`` (a folder or hub id, any head) to ``corpus``; writes ``output`` and returns the report
    (also ``pruning_report.json`` in it). Skipped when ``output`` holds this pruning already."""
    from minirbt.export import HEADS, detect_task, load_task_model
    from minirbt.modeling import check_model_folder, resolve_model
    from minirbt.tokenization import TOKENIZER_CONFIG, load_tokenizer

    if min_count < 1:
        raise CorpusError(f"--min_count must be an integer of at least 1, got {min_count!r}")
    folder = check_model_folder(resolve_model(model, "--model"), "--model")
    c = Path(corpus)
    corpus_print = stages.folder_fingerprint(c) if c.is_dir() else stages.file_fingerprint(c) if c.is_file() \
        else None
    if corpus_print is None:
        raise CorpusError(f"--corpus not found: {corpus}")
    request = {"settings": {"pruned_vocab_min_count": min_count},
               "inputs": {"model": stages.input_entry(folder, stages.model_fingerprint(folder)),
                          "corpus": stages.input_entry(c, corpus_print)}}
    claim = stages.claim(stages.MODEL, output, request, flag="--output", overwrite=overwrite,
                         inputs=[("--model", folder), ("--corpus", c)])
    if claim.state == "done":
        print(f"{output}: pruned to this corpus already (same model, corpus and --min_count), skipped")
        return json.loads((Path(output) / "pruning_report.json").read_text())
    tokenizer = load_tokenizer(folder)
    task = detect_task(folder)
    original = load_task_model(folder, task)
    counts, read = count_corpus(c, tokenizer)
    keep = kept_ids(counts, tokenizer, min_count)
    pruned = prune_model(original, keep)
    vocab = [tokenizer.convert_ids_to_tokens(i) for i in keep]
    unseen = sum(n for i, n in counts.items() if int(i) == tokenizer.unk_token_id)
    report = {"model": str(folder), "head": HEADS[task][0].__name__, "read": read, "min_count": min_count,
              "vocab_before": len(tokenizer), "vocab_after": len(keep),
              "corpus_tokens": int(sum(counts.values())), "corpus_unk_tokens": int(unseen),
              "params_before": sum(p.numel() for p in original.parameters()),  # tied decoder counted once
              "params_after": sum(p.numel() for p in pruned.parameters()),
              "bytes_before": folder_bytes(folder)}
    with atomic_path(output, is_dir=True, replace=claim.state == "replace") as tmp:
        pruned.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
        src_config = folder / "tokenizer_config.json"
        tok_config = json.loads(src_config.read_text()) if src_config.is_file() else dict(TOKENIZER_CONFIG)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        if (folder / "special_tokens_map.json").is_file():  # tokenizer.json (fast, full vocab) is not carried
            shutil.copyfile(folder / "special_tokens_map.json", tmp / "special_tokens_map.json")
        report["bytes_after"] = folder_bytes(tmp)
        (tmp / "pruning_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        stages.write_record(stages.MODEL, tmp, request, complete=True)
    return report


def report_line(report: dict, output: str) -> str:
    return (f"{output}: vocabulary {report['vocab_before']:,} -> {report['vocab_after']:,} tokens, parameters "
            f"{report['params_before'] / 1e6:.2f}M -> {report['params_after'] / 1e6:.2f}M, weights file "
            f"{report['bytes_before'] / 1e6:.2f} MB -> {report['bytes_after'] / 1e6:.2f} MB "
            f"({report['corpus_tokens']:,} corpus tokens read, {report['corpus_unk_tokens']:,} of them [UNK])")
