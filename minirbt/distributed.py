"""Processes and ranks: torchrun's environment, this process's device, and the rule that every rank takes the
same decision (a rank that failed or decided alone would leave the others waiting at the next collective).

One process (plain ``python``) has world 1 and none of this talks to a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from minirbt.cli import enable_tf32
from minirbt.textio import CorpusError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


# Rank 0 evaluates and writes checkpoints (~1 GB for RoBERTa with its optimizer, slow on NFS) while the others
# wait at a barrier: torch's default of 10 minutes is short for that.
PROCESS_GROUP_TIMEOUT_MINUTES = float(os.environ.get("MINIRBT_DIST_TIMEOUT_MINUTES", 60))


def setup_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; plain python runs one process. On CUDA each process takes the GPU
    of :func:`cuda_index` and fp32 matmuls use TF32."""
    from datetime import timedelta

    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
             int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", cuda_index(device, d))
        torch.cuda.set_device(dev)
        enable_tf32()
    else:
        dev = torch.device("cpu")
    if d.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                timeout=timedelta(minutes=PROCESS_GROUP_TIMEOUT_MINUTES))
    return d, dev


def cuda_index(device: str | None, d: Dist) -> int:
    """The GPU of this process: ``--device cuda:N`` in a single process; under torchrun ``LOCAL_RANK`` (modulo the
    visible devices: a scheduler may expose one GPU per task). Refused: an index under torchrun, and more
    processes on a node than GPUs it shows (two ranks on one GPU: NCCL's "Duplicate GPU detected")."""
    count = torch.cuda.device_count()
    explicit = device is not None and ":" in device
    if d.world > 1 and explicit:
        raise CorpusError(f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                          "pass --device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)")
    if explicit:
        return int(device.split(":", 1)[1])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if per_node > count:
        raise CorpusError(f"torchrun started {per_node} processes on this node but it shows {count} GPU(s): "
                          f"use --nproc_per_node {count} or fewer")
    return d.local_rank % count


def on_every_rank(d: Dist, fn, what: str):
    """``fn()`` on every rank; when it fails on any rank, fail on all of them (a rank that stopped alone would leave
    the others waiting at the next collective until the timeout). ``what``: the step, for the message."""
    try:
        result, error, exc = fn(), None, None
    except Exception as e:  # noqa: BLE001 - re-raised below, on this rank as it was
        result, error, exc = None, str(e) if isinstance(e, CorpusError) else f"{type(e).__name__}: {e}", e
    if d.world > 1:
        errors: list = [None] * d.world
        dist.all_gather_object(errors, error)
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if failed and exc is None:
            rank, e = failed[0]
            raise CorpusError(f"{what} failed on rank {rank} (of {d.world}): {e}")
    if exc is not None:
        raise exc
    return result


def agree(d: Dist, facts: dict, what: str) -> None:
    """Every rank must have found the same ``facts`` (the claim on output_dir, the step to resume from, the inputs'
    fingerprints); otherwise every rank stops with a message, instead of training different loops that hang."""
    if d.world == 1:
        return
    gathered: list = [None] * d.world
    dist.all_gather_object(gathered, facts)
    if any(g != gathered[0] for g in gathered):
        differ = sorted({k for g in gathered for k in g if g.get(k) != gathered[0].get(k)})
        seen = "; ".join(f"rank {r}: " + ", ".join(f"{k}={g.get(k)}" for k in differ) for r, g in enumerate(gathered))
        raise CorpusError(f"the {d.world} processes disagree about {what} ({seen}). With several nodes, the output "
                          f"folder, the dataset and a stage-2 teacher must be on a filesystem every node sees "
                          f"(with node-local disks each node finds its own copy, or none, and they would train "
                          f"different loops)")


def wrap_ddp(module: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """The module DDP-wrapped on several processes (itself on one). Called after every rank has built its run: the
    constructor's own collectives would otherwise meet another rank's error report and hang. Buffers (position
    ids) never change: no broadcast each forward; gradients live in DDP's buckets."""
    if d.world == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                               broadcast_buffers=False, gradient_as_bucket_view=True)
