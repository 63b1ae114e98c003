"""Stage 2: tokenize the corpus, attach the refs, cut into fixed-length chunks (Arrow).

    python pretraining/my_datasets.py --train_file corpus.txt --train_ref_file corpus_ref.txt \
        --dev_file dev.txt --dev_ref_file dev_ref.txt \
        --tokenizer pretrained_model_path/RoBERTa-wwm-ext --max_seq_length 512 --output_dir dataset/cached

MiniRBT's ``data.json`` layout also works: ``--data_files_json data.json`` with
``{"train": [...], "train_ref": [...], "dev": [...], "dev_ref": [...]}`` (paths
relative to the JSON file). See ``minirbt/data.py`` for what is built and checked.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, from any folder

from minirbt.cli import OVERWRITE_HELP, check_ranges, default_workers, parse, run  # noqa: E402
from minirbt.data import build_pretraining_dataset  # noqa: E402
from minirbt.modeling import default_teacher_folder, resolve_model  # noqa: E402
from minirbt.textio import CorpusError  # noqa: E402


@dataclass
class DatasetArguments:
    output_dir: str = field(metadata={"help": "Folder for the Arrow dataset (written atomically)."})
    train_file: list[str] = field(default_factory=list, metadata={"nargs": "*", "help": "Corpus files."})
    train_ref_file: list[str] = field(default_factory=list, metadata={"nargs": "*", "help": "Their ref files."})
    dev_file: list[str] = field(default_factory=list, metadata={"nargs": "*", "help": "Dev corpus files."})
    dev_ref_file: list[str] = field(default_factory=list, metadata={"nargs": "*", "help": "Their ref files."})
    data_files_json: str | None = field(default=None, metadata={"help": "MiniRBT-style data.json instead."})
    tokenizer: str = field(default_factory=lambda: str(default_teacher_folder()),
                           metadata={"aliases": ["--bert"], "help": "Model folder with vocab.txt."})
    max_seq_length: int = field(default=512, metadata={"help": "Chunk length including [CLS] and [SEP]."})
    num_workers: int = field(default_factory=default_workers, metadata={"help": "Processes for tokenizing."})
    encoding_errors: Literal["strict", "replace"] = field(
        default="strict", metadata={"help": "As given to run_chinese_ref.py."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache (default: HF_DATASETS_CACHE)."})
    overwrite_output: bool = field(default=False, metadata={"help": OVERWRITE_HELP})

    def __post_init__(self):
        check_ranges(self, at_least_1=("max_seq_length", "num_workers"))


def _from_json(path: str) -> dict[str, list[str]]:
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"--data_files_json not found: {p}")
    try:
        spec = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorpusError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise CorpusError(f"{p}: expected a JSON object with train, train_ref, dev, dev_ref lists")
    out = {}
    for key in ("train", "train_ref", "dev", "dev_ref"):
        value = spec.get(key, [])
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CorpusError(f"{p}: {key!r} must be a file name or a list of file names, got {value!r}")
        out[key] = [str((p.parent / v) if not Path(v).is_absolute() else Path(v)) for v in value]
    return out


def main() -> None:
    (args,) = parse(DatasetArguments)
    if args.data_files_json:
        files = _from_json(args.data_files_json)
        train, train_ref, dev, dev_ref = files["train"], files["train_ref"], files["dev"], files["dev_ref"]
    else:
        train, train_ref, dev, dev_ref = args.train_file, args.train_ref_file, args.dev_file, args.dev_ref_file
    if not train:
        raise CorpusError("no training files: give --train_file F [F ...] --train_ref_file R [R ...] "
                          "or --data_files_json data.json")
    args.tokenizer = resolve_model(args.tokenizer, "--tokenizer")  # a folder or a Hugging Face model id
    manifest = build_pretraining_dataset(
        train, train_ref, args.tokenizer, args.output_dir, max_seq_length=args.max_seq_length,
        dev_files=dev, dev_refs=dev_ref, num_workers=args.num_workers, errors=args.encoding_errors,
        cache_dir=args.cache_dir, overwrite=args.overwrite_output)
    state = "up to date, reused (same inputs and settings)" if manifest["reused"] else "written"
    for name, s in manifest["splits"].items():
        print(f"{name}: {s['lines']} lines, {s['tokens']} tokens -> {s['chunks']} chunks of <= "
              f"{args.max_seq_length} tokens")
    print(f"{args.output_dir}: {state}")


if __name__ == "__main__":
    run(main)
