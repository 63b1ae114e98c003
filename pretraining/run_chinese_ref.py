"""Stage 1: segment a Chinese corpus into words and write whole-word-mask refs.

    python pretraining/run_chinese_ref.py --input corpus.txt --output corpus_ref.txt \
        --tokenizer pretrained_model_path/RoBERTa-wwm-ext --segmenter ltp --ltp_model pretrained_model_path/ltp_cws

One JSON list per corpus line (blank lines get ``[]``), see ``minirbt/refs.py``.
With no --input/--output it follows MiniRBT's layout under the repository root:
``dataset/{train,dev}/{train,dev}_files/*`` -> ``dataset/{train,dev}/ref_files/<stem>_ref.txt``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, from any folder

from transformers import HfArgumentParser  # noqa: E402

from minirbt.cli import default_workers, run  # noqa: E402
from minirbt.refs import RefSpec, RefWriter, ref_name  # noqa: E402
from minirbt.textio import CorpusError, list_corpus_files  # noqa: E402


@dataclass
class RefArguments:
    input: str | None = field(default=None, metadata={"help": "Corpus file, or folder of corpus files."})
    output: str | None = field(
        default=None, metadata={"help": "Ref file (for a file input) or folder (for a folder input)."})
    tokenizer: str = field(
        default=str(ROOT / "pretrained_model_path" / "RoBERTa"),
        metadata={"aliases": ["--bert"], "help": "Model folder with vocab.txt (the teacher's). Alias: --bert."})
    segmenter: Literal["ltp", "jieba"] = field(default="ltp", metadata={"help": "Word segmenter."})
    ltp_model: str = field(
        default=str(ROOT / "pretrained_model_path" / "ltp_cws"),
        metadata={"aliases": ["--ltp"], "help": "Local LTP folder (legacy perceptron or neural)."})
    user_dict: str | None = field(default=None, metadata={"help": "jieba user dictionary (optional)."})
    num_workers: int = field(default_factory=default_workers, metadata={"help": "Worker processes (default: cores)."})
    batch_size: int = field(default=2000, metadata={"help": "Lines per work unit sent to a worker."})
    device: Literal["cpu", "cuda"] = field(default="cpu", metadata={"help": "Device for a neural LTP model."})
    encoding_errors: Literal["strict", "replace"] = field(
        default="strict", metadata={"help": "Invalid UTF-8: 'strict' stops with the file and line; 'replace' "
                                            "reads it as U+FFFD (give my_datasets.py the same)."})


def miniRBT_layout() -> list[tuple[Path, Path]]:
    pairs = []
    for split in ("train", "dev"):
        src = ROOT / "dataset" / split / f"{split}_files"
        if src.is_dir():
            for f in list_corpus_files(src):
                pairs.append((f, ROOT / "dataset" / split / "ref_files" / ref_name(f)))
    if not pairs:
        raise CorpusError(
            f"no --input given and MiniRBT's layout is absent: put corpus files in "
            f"{ROOT / 'dataset/train/train_files'}/ (and optionally dataset/dev/dev_files/), "
            "or pass --input FILE_OR_DIR --output FILE_OR_DIR")
    return pairs


def main() -> None:
    (args,) = HfArgumentParser(RefArguments).parse_args_into_dataclasses()
    if args.input is None:
        if args.output is not None:
            raise CorpusError("--output given without --input")
        pairs = miniRBT_layout()
    else:
        src = Path(args.input)
        if not src.exists():
            raise CorpusError(f"--input not found: {src}")
        if args.output is None:
            raise CorpusError("--output is required with --input")
        if src.is_dir():
            pairs = [(f, Path(args.output) / ref_name(f)) for f in list_corpus_files(src)]
        else:
            if Path(args.output).is_dir():
                raise CorpusError(f"--output {args.output} is a folder but --input is a file: give a file name")
            pairs = [(src, Path(args.output))]

    spec = RefSpec(args.tokenizer, args.segmenter, args.ltp_model if args.segmenter == "ltp" else None,
                   args.user_dict, args.device)
    builder = spec.build()  # here first: a missing tokenizer or model is reported before any work
    # One process drives a GPU; on CPU, worker processes over blocks of lines.
    workers = 1 if args.device == "cuda" else args.num_workers
    with RefWriter(builder if workers == 1 else spec, workers, args.batch_size, args.encoding_errors) as writer:
        for src, dst in pairs:
            stats = writer.write(src, dst)
            print(f"{src} -> {dst}: {stats.lines} lines ({stats.segmented} distinct segmented) in "
                  f"{stats.seconds:.1f} s ({stats.lines_per_s:,.0f} lines/s)")


if __name__ == "__main__":
    run(main)
