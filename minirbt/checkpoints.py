"""Checkpoints of every training stage, written atomically (a half-written one is a hidden temp folder).

* pretraining (``minirbt.trainer``): ``output_dir/checkpoint-NNNNNNN/``, a model folder plus
  ``training_state.pt`` (step, optimizer, schedule, projections, arguments, curves); the newest
  ``save_total_limit`` are kept;
* fine-tuning (``minirbt.finetune``): ``output_dir/checkpoints/seed-S-epoch-E/`` after every epoch and
  ``seed-S-done/`` once a seed is finished, see :class:`SeedCheckpoints`.

States are loaded with ``torch.load(weights_only=True)``, weights with safetensors.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minirbt.faults import fault_point
from minirbt.modeling import write_model_files
from minirbt.optim import Optimization
from minirbt.textio import atomic_path

STATE_NAME = "training_state.pt"


# ------------------------------------------------------------------ pretraining: one per N steps
def checkpoints(output_dir: Path) -> list[Path]:
    """Complete pretraining checkpoints, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and (p / STATE_NAME).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    """The step of a ``checkpoint-NNNNNNN`` folder, from its name."""
    return int(folder.name.split("-")[1])


def save_checkpoint(output_dir: Path, step: int, model, projections, optimization: Optimization, vocab_file: Path,
                    args, limit: int, logs: dict | None = None) -> Path:
    final = output_dir / f"checkpoint-{step:07d}"
    with atomic_path(final, is_dir=True, replace=True) as tmp:
        write_model_files(model, vocab_file, tmp)
        fault_point("checkpoint.model")
        torch.save({"step": step, **optimization.state_dict(), "projections": projections.state_dict(),
                    "args": asdict(args), "logs": logs or {}}, tmp / STATE_NAME)
        fault_point("checkpoint.state")
    for old in checkpoints(output_dir)[:-limit] if limit > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_state(folder: Path) -> dict:
    return torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)


def pretraining_kept(out: Path) -> str:
    """What a stopped pretraining run leaves behind, truthfully."""
    found = checkpoints(out)
    if not found:
        return f"no checkpoint was written yet in {out}: a re-run starts from step 0"
    step = checkpoint_step(found[-1])
    return f"the newest checkpoint, {found[-1]} (step {step}), is kept: re-run with --resume to continue from it"


# ------------------------------------------------------------------ fine-tuning: one per seed and epoch
def contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores no shared or strided tensors: tied weights are written as copies."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


class SeedCheckpoints:
    """``output_dir/checkpoints/seed-S-epoch-E/``: after every epoch, the model, the best-on-dev weights so far,
    optimizer, schedule and torch RNG state (dropout), so a killed run resumes at the last finished epoch and
    ends with the same weights. ``seed-S-done/`` keeps a finished seed's record and best weights. Each folder
    is written atomically; older epochs are removed once a newer one is in place."""

    def __init__(self, output_dir: str | Path, seed: int, resume: bool):
        self.root = Path(output_dir) / "checkpoints"
        self.seed = seed
        if not resume and self.root.is_dir():
            for old in self.root.glob(f"seed-{seed}-*"):
                shutil.rmtree(old, ignore_errors=True)

    def _epochs(self) -> list[Path]:
        found = [p for p in self.root.glob(f"seed-{self.seed}-epoch-*") if (p / "state.pt").is_file()]
        return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))

    @property
    def done_dir(self) -> Path:
        return self.root / f"seed-{self.seed}-done"

    def finished(self) -> dict | None:
        record = self.done_dir / "record.json"
        return json.loads(record.read_text()) if record.is_file() else None

    def best_weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.done_dir / "best.safetensors"))

    def save_epoch(self, epoch: int, model, projections, optimization: Optimization, best: dict,
                   history: list[dict]) -> None:
        with atomic_path(self.root / f"seed-{self.seed}-epoch-{epoch}", is_dir=True, replace=True) as tmp:
            save_file(contiguous(model.state_dict()), str(tmp / "model.safetensors"))
            save_file(contiguous(best["state"]), str(tmp / "best.safetensors"))
            fault_point("finetune.checkpoint")
            torch.save({"epoch": epoch, **optimization.state_dict(), "projections": projections.state_dict(),
                        "rng": torch.get_rng_state(), "cuda_rng": cuda_rng_states(),
                        "best": {k: v for k, v in best.items() if k != "state"}, "history": history},
                       tmp / "state.pt")
        for old in self._epochs()[:-1]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, model, projections, optimization: Optimization) -> tuple[int, dict, list[dict]]:
        """(epochs done, best so far, history); (0, no best, []) without a checkpoint."""
        found = self._epochs()
        if not found:
            return 0, {}, []
        state = torch.load(found[-1] / "state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(load_file(str(found[-1] / "model.safetensors")))
        projections.load_state_dict(state["projections"])
        optimization.load_state_dict(state)
        torch.set_rng_state(state["rng"])
        restore_cuda_rng_states(state.get("cuda_rng", []))
        best = dict(state["best"], state=load_file(str(found[-1] / "best.safetensors")))
        print(f"seed {self.seed}: resuming after epoch {state['epoch']} ({found[-1]})", flush=True)
        return int(state["epoch"]), best, list(state["history"])

    def finish(self, record: dict, best_state: dict[str, torch.Tensor]) -> None:
        with atomic_path(self.done_dir, is_dir=True, replace=True) as tmp:
            save_file(contiguous(best_state), str(tmp / "best.safetensors"))
            (tmp / "record.json").write_text(json.dumps(record, indent=2) + "\n")
        for old in self._epochs():
            shutil.rmtree(old, ignore_errors=True)


def finetuning_kept(output_dir: str | Path) -> str:
    """What a stopped fine-tuning run leaves behind, truthfully."""
    root = Path(output_dir) / "checkpoints"
    done = sorted(p.name.split("-")[1] for p in root.glob("seed-*-done"))
    epochs = sorted(p.name for p in root.glob("seed-*-epoch-*") if (p / "state.pt").is_file())
    if not done and not epochs:
        return "no epoch had finished, nothing was kept: a re-run starts again"
    kept = ([f"finished seeds {', '.join(done)}"] if done else []) + ([f"checkpoints {', '.join(epochs)}"]
                                                                         if epochs else [])
    return f"kept in {root}: {'; '.join(kept)}; re-run with --resume to continue"


def cuda_rng_states() -> list[torch.Tensor]:
    """The CUDA generators' states (dropout on a GPU draws from them, not from the CPU generator); [] without CUDA."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def restore_cuda_rng_states(states: list[torch.Tensor]) -> None:
    """Put back what :func:`cuda_rng_states` saved, on as many devices as both runs have."""
    if states and torch.cuda.is_available():
        for index, state in enumerate(states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
