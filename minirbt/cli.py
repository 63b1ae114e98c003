"""Small helpers shared by the command-line scripts: parsing, argument checks, and the
one-line error contract (a user mistake prints ``error: ...`` and exits with status 2,
never a traceback)."""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from minirbt.textio import CorpusError

OVERWRITE_HELP = ("Replace an earlier output of this command that was made with other settings (inputs are never "
                  "replaced; a folder of anything else is always refused).")


@dataclass(kw_only=True)
class TrainingFlags:
    """The flags every training script has, with one meaning and one default (pretraining/train.py,
    finetuning/run_classification.py, finetuning/run_mrc.py); each script's own flags follow them."""

    weight_decay: float = field(default=0.01, metadata={
        "help": "AdamW weight decay (not on biases, LayerNorm or match projections)."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Linear warm-up share of the optimizer steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (global L2 norm)."})
    bf16: bool = field(default=False, metadata={
        "help": "bf16 autocast of the forward passes (losses and the trained weights in fp32; a frozen pretraining "
                "teacher is stored in bf16)."})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)."})
    resume: bool = field(default=False, metadata={
        "help": "Continue an interrupted run from its newest checkpoint in output_dir."})
    overwrite_output: bool = field(default=False, metadata={"help": OVERWRITE_HELP})


def default_workers() -> int:
    """One worker per available core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _OneLineErrors:
    """argparse prints the usage and ``prog: error: ...``; ours raises, so ``run`` prints one ``error:`` line."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        raise CorpusError(f"{message} (see --help)")


class ArgumentParser(_OneLineErrors, argparse.ArgumentParser):
    pass


def parse(*dataclass_types, defaults: dict | None = None, argv: list[str] | None = None) -> tuple:
    """``HfArgumentParser(...).parse_args_into_dataclasses()`` with one-line errors; ``__post_init__`` checks run.
    ``defaults`` replace the dataclasses' defaults (a recipe's settings; flags given on the command line win)."""
    from transformers import HfArgumentParser

    class Parser(_OneLineErrors, HfArgumentParser):
        pass

    parser = Parser(dataclass_types)
    if defaults:
        parser.set_defaults(**defaults)
    *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        raise CorpusError(f"unrecognized arguments: {' '.join(rest)} (see --help)")
    return tuple(parsed)


def parse_json(dataclass_type, path: str) -> tuple:
    """One dataclass from a JSON file of its fields (unknown keys refused); ``__post_init__`` checks run."""
    import json
    from dataclasses import fields

    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (OSError, json.JSONDecodeError) as e:
        raise CorpusError(f"{path}: cannot read the arguments ({e})") from None
    unknown = sorted(set(data) - {f.name for f in fields(dataclass_type)})
    if unknown:
        raise CorpusError(f"{path}: unknown argument(s) {', '.join(unknown)}")
    return (dataclass_type(**data),)


# ------------------------------------------------------------------ argument checks (in __post_init__)
def _bad(name: str, value: Any, rule: str) -> CorpusError:
    return CorpusError(f"--{name} must be {rule}, got {value!r}")


def check_ranges(args: Any, *, at_least_1: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 positive: tuple[str, ...] = (), probability: tuple[str, ...] = (),
                 fraction: tuple[str, ...] = ()) -> None:
    """Validate numeric arguments up front, naming the flag. ``None`` (an unset optional) passes.

    at_least_1: integers >= 1; non_negative: >= 0; positive: > 0 and finite; probability: in (0, 1);
    fraction: in [0, 1)."""
    for name in at_least_1:
        v = getattr(args, name)
        if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
            raise _bad(name, v, "an integer of at least 1")
    for name in non_negative:
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise _bad(name, v, "a finite number >= 0")
    for name in positive:
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise _bad(name, v, "a finite number > 0")
    for name in probability:
        v = getattr(args, name)
        if v is not None and not (0 < v < 1):
            raise _bad(name, v, "a probability strictly between 0 and 1")
    for name in fraction:
        v = getattr(args, name)
        if v is not None and not (0 <= v < 1):
            raise _bad(name, v, "a share in [0, 1)")


def check_device(device: str | None) -> None:
    """``--device``: cpu, cuda or cuda:N, and CUDA must exist when asked for."""
    if device is None:
        return
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise CorpusError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CorpusError(f"--device {device}: this machine has no CUDA device (or torch is a CPU build); "
                              "use --device cpu")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise CorpusError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """``1,2,3`` -> [1, 2, 3]; non-negative integers, no repeats."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise CorpusError(f"{flag} must be comma-separated integers such as 1,2,3, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise CorpusError(f"{flag} must list distinct non-negative integers such as 1,2,3, got {text!r}")
    return seeds


# ------------------------------------------------------------------ running a script
_OS_HINTS = {
    errno.ENOSPC: "free some space (or point the output elsewhere) and re-run",
    errno.EDQUOT: "free some space under your quota and re-run",
    errno.EACCES: "check the permissions of the path",
    errno.EPERM: "check the permissions of the path",
    errno.EROFS: "the filesystem is read-only: write the output elsewhere",
    errno.ENOENT: "check the path",
    errno.EEXIST: "remove it or give another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "give a file, not a folder",
}


def os_error_message(e: OSError) -> str:
    where = " -> ".join(str(x) for x in (e.filename, e.filename2) if x is not None)
    text = e.strerror or str(e)
    hint = _OS_HINTS.get(e.errno or 0)
    return f"{where + ': ' if where else ''}{text}" + (f" ({hint})" if hint else "")


def run(main: Callable[[], int | None]) -> None:
    """Run a script's ``main``; user mistakes and OS errors end with one ``error:`` line and status 2.

    A stage that keeps something on Ctrl-C says what by raising ``KeyboardInterrupt(message)``."""
    try:
        code = main()
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        what = e.args[0] if e.args else "no partial output was kept (outputs are written whole or not at all)"
        print(f"\ninterrupted: {what}", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def warn_emulated_bf16(device, bf16: bool) -> None:
    """``--bf16`` on a GPU before Ampere (V100, T4: compute capability < 8) runs, but emulated: slower than fp32.
    torch.autocast accepts it silently, so say so once."""
    import torch

    if bf16 and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        major, minor = torch.cuda.get_device_capability(device)
        print(f"warning: --bf16 on {torch.cuda.get_device_name(device)} (compute capability {major}.{minor} < 8.0) "
              "is emulated and slower than fp32; leave --bf16 off on this GPU", file=sys.stderr, flush=True)


def enable_tf32() -> None:
    """fp32 matmuls in TF32 on CUDA (torch's "high" precision): the match projections and losses run outside
    autocast, and fine-tuning defaults to fp32; TF32 keeps fp32's range with a 10-bit mantissa, which BERT
    training tolerates (NVIDIA's and Hugging Face's defaults for Ampere and later)."""
    import torch

    torch.set_float32_matmul_precision("high")
