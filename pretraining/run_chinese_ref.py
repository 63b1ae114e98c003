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

from minirbt import stages  # noqa: E402
from minirbt.cli import OVERWRITE_HELP, check_device, check_ranges, default_workers, parse, run  # noqa: E402
from minirbt.modeling import default_teacher_folder, resolve_model  # noqa: E402
from minirbt.refs import RefSpec, RefWriter, ref_name, ref_request  # noqa: E402
from minirbt.textio import CorpusError, list_corpus_files  # noqa: E402


@dataclass
class RefArguments:
    input: str | None = field(default=None, metadata={"help": "Corpus file, or folder of corpus files."})
    output: str | None = field(
        default=None, metadata={"help": "Ref file (for a file input) or folder (for a folder input)."})
    tokenizer: str = field(
        default_factory=lambda: str(default_teacher_folder()),
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
    overwrite_output: bool = field(default=False, metadata={"help": OVERWRITE_HELP})

    def __post_init__(self):
        check_ranges(self, at_least_1=("num_workers", "batch_size"))


def miniRBT_layout() -> list[tuple[Path, Path, list[Path]]]:
    """(input folder, output folder, corpus files) per split of MiniRBT's layout."""
    jobs = []
    for split in ("train", "dev"):
        src = ROOT / "dataset" / split / f"{split}_files"
        if src.is_dir():
            jobs.append((src, ROOT / "dataset" / split / "ref_files", list_corpus_files(src)))
    if not jobs:
        raise CorpusError(
            f"no --input given and MiniRBT's layout is absent: put corpus files in "
            f"{ROOT / 'dataset/train/train_files'}/ (and optionally dataset/dev/dev_files/), "
            "or pass --input FILE_OR_DIR --output FILE_OR_DIR")
    return jobs


def plan(args: RefArguments) -> list[tuple[Path, Path, list[Path]]]:
    """(input, output, corpus files): one job per output (a ref file, or a folder of them)."""
    if args.input is None:
        if args.output is not None:
            raise CorpusError("--output given without --input")
        return miniRBT_layout()
    src = Path(args.input)
    if not src.exists():
        raise CorpusError(f"--input not found: {src}")
    if args.output is None:
        raise CorpusError("--output is required with --input")
    if src.is_dir():
        return [(src, Path(args.output), list_corpus_files(src))]
    if Path(args.output).is_dir():
        raise CorpusError(f"--output {args.output} is a folder but --input is a file: give a file name")
    return [(src, Path(args.output), [src])]


def main() -> None:
    (args,) = parse(RefArguments)
    check_device(args.device)
    jobs = plan(args)
    args.tokenizer = resolve_model(args.tokenizer, "--tokenizer")  # a folder or a Hugging Face model id
    spec = RefSpec(args.tokenizer, args.segmenter, args.ltp_model if args.segmenter == "ltp" else None,
                   args.user_dict, args.device)
    builder = spec.build()  # here first: a missing tokenizer or model is reported before any work
    claims = []
    for src, dst, files in jobs:
        kind = stages.REFS_FOLDER if src.is_dir() else stages.REFS_FILE
        names = [ref_name(f) for f in files]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise CorpusError(f"{src}: several corpus files would write {clash[0]} (same name before the "
                              "extension): rename them")
        request = ref_request(spec, args.encoding_errors, files)
        inputs = [("--input", src), ("--tokenizer", args.tokenizer), ("--user_dict", args.user_dict)]
        if args.segmenter == "ltp":
            inputs.append(("--ltp_model", args.ltp_model))
        claim = stages.claim(kind, dst, request, flag="--output", inputs=inputs, overwrite=args.overwrite_output)
        claims.append((kind, claim, request, files, names))
    # One process drives a GPU; on CPU, worker processes over blocks of lines.
    workers = 1 if args.device == "cuda" else args.num_workers
    with RefWriter(builder if workers == 1 else spec, workers, args.batch_size, args.encoding_errors) as writer:
        for kind, claim, request, files, names in claims:
            if claim.state == "done":
                print(f"{claim.path}: refs up to date (same corpus and settings), skipped")
                continue
            if kind.folder:
                if claim.state == "replace":
                    stages.clear_output(kind, claim.path, (claim.record or {}).get("files", []))
                claim.path.mkdir(parents=True, exist_ok=True)
            stages.write_record(kind, claim.path, request, complete=False, files=names)
            for f, name in zip(files, names):
                dst = claim.path / name if kind.folder else claim.path
                stats = writer.write(f, dst)
                print(f"{f} -> {dst}: {stats.lines} lines ({stats.segmented} distinct segmented) in "
                      f"{stats.seconds:.1f} s ({stats.lines_per_s:,.0f} lines/s)")
            stages.mark_complete(kind, claim.path)


if __name__ == "__main__":
    run(main)
