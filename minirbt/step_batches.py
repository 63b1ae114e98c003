"""The pretraining input pipeline: which examples, with which masks, every micro-batch of every step takes.

Per optimizer step ``s`` the global batch is the next ``G = batch_size x gradient_accumulation_steps x
world_size`` examples of a seeded permutation of the dataset (a new permutation each epoch). Rank ``r``,
micro-step ``m`` takes the ``(r x A + m)``-th slice of ``batch_size`` examples, and its whole-word masks come
from ``(seed, step, r x A + m)``: one process with A=2 and two processes with A=1 see the same examples with the
same masks, a resumed run the same batches as an uninterrupted one, and DataLoader workers can prepare steps
ahead in any process. Dropout follows the same rule (:func:`sub_seed`, in the loop).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
import traceback

import numpy as np
import torch

from minirbt.collator import ChineseWWMCollator
from minirbt.mlm_eval import host_batch
from minirbt.pretrain_setup import DistillArguments
from minirbt.textio import CorpusError


def sub_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (step, micro-batch, ...), independent across its inputs."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] % (2**63))


class DataOrder:
    """Example index at global position p: a seeded permutation per epoch."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise CorpusError("the training split of the dataset is empty")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for p in range(start, start + count):
            epoch = p // self.n
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out.append(int(self._perm[p % self.n]))
        return out


class StepBatches(torch.utils.data.Dataset):
    """Item k: this rank's micro-batches of step k, collated on the host (examples and masks from (seed, step,
    global micro-batch index) alone)."""

    def __init__(self, train, tokenizer, args: DistillArguments, rank: int, world: int):
        self.train, self.tokenizer, self.args, self.rank, self.world = train, tokenizer, args, rank, world
        self.collator: ChineseWWMCollator | None = None  # made in the process that uses it (a worker)
        self.order: DataOrder | None = None

    def __len__(self) -> int:
        return self.args.max_steps

    def __getitem__(self, step: int) -> list[dict]:
        args = self.args
        if self.collator is None:
            self.collator = ChineseWWMCollator(self.tokenizer, args.mlm_probability, seed=args.seed)
            self.order = DataOrder(len(self.train), args.seed)
        A, B = args.gradient_accumulation_steps, args.batch_size
        global_batch = B * A * self.world
        batches = []
        for m in range(A):
            g = self.rank * A + m  # global micro-batch index within the step
            idx = self.order.indices(step * global_batch + g * B, B)
            columns = self.train[idx]  # one Arrow read for the micro-batch, not one per example
            examples = [dict(zip(columns, values)) for values in zip(*columns.values())]
            self.collator.rng = np.random.default_rng([args.seed, step, g])
            batches.append(host_batch(self.collator, examples))
        return batches


def step_loader(train, tokenizer, args: DistillArguments, rank: int, world: int, start: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    """Steps start .. max_steps - 1 in order, prepared by ``--dataloader_workers`` processes ahead of the loop
    (pinned for CUDA copies); the training process only waits when the workers fall behind."""
    workers = args.dataloader_workers
    steps = StepBatches(train, tokenizer, args, rank, world)
    if not workers:
        return torch.utils.data.DataLoader(steps, batch_size=None, sampler=range(start, args.max_steps))
    # Workers start from a small server process, not forked from the training process: a worker forked from
    # it would share its pages copy-on-write, and each page the loop then writes (weights, optimizer state,
    # reused activation memory) would be copied once more, hundreds of MB (bench/train_loop.py: a steady data
    # overhead of 0.085 with fork, 0.017 so). The server imports this module once, so a worker starts without
    # importing torch again; it serves every run of the process.
    if "forkserver" in torch.multiprocessing.get_all_start_methods():
        ctx = torch.multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:  # Windows: spawn, which shares no pages either
        ctx = torch.multiprocessing.get_context("spawn")
    # A worker's parent is that server, so DataLoader's own check (is my parent alive?) would not see the
    # training process die: each worker also watches a pipe whose only writer is the training process.
    alive_r, alive_w = ctx.Pipe(duplex=False)
    # Training on the CPU, workers and compute threads share the cores: below the training process in the
    # scheduler, a worker runs while a core waits, not in the middle of a step's parallel region (whose threads
    # all wait for the one the kernel put aside). On CUDA the workers keep their priority: there the training
    # process mostly waits for the GPU, and niced workers on busy cores could fall behind it.
    niceness = 10 if device.type == "cpu" else 0
    loader = _WatchedLoader(steps, batch_size=None, sampler=range(start, args.max_steps), num_workers=workers,
                            pin_memory=device.type == "cuda", prefetch_factor=2, persistent_workers=False,
                            multiprocessing_context=ctx, worker_init_fn=ExitWithTrainer(alive_r, niceness))
    loader.trainer_alive = alive_w
    return loader


class _WatchedLoader(torch.utils.data.DataLoader):
    """A DataLoader whose iterators hold the writing end of the workers' pipe: closed when the iterator goes
    (or this process dies), which ends the workers."""

    def __iter__(self):
        batches = super().__iter__()
        batches.trainer_alive = self.trainer_alive
        return batches


def _quiet_broken_handoff(report):
    """A worker's ``sys.excepthook`` that stays silent about one error: a batch's shared-memory handle whose
    hand-off the training process broke off by ending (Ctrl-C while it unpickled a batch). multiprocessing's
    resource-sharer thread reports it through ``sys.excepthook``, on the stderr the worker shares with the
    training process, after that process's own last line ("interrupted: ..."); the worker ends right after."""

    def hook(kind, value, tb) -> None:
        if issubclass(kind, (EOFError, OSError, multiprocessing.AuthenticationError)) and any(
                frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "resource_sharer.py"))
                for frame, _ in traceback.walk_tb(tb)):
            return
        report(kind, value, tb)

    return hook


class ExitWithTrainer:
    """``worker_init_fn``: a daemon thread that ends the worker once the training process's end of the pipe is
    closed (its exit, or a SIGKILL), so no worker outlives the run; ``niceness``: added to the worker's."""

    def __init__(self, alive_r, niceness: int = 0):
        self.alive_r = alive_r
        self.niceness = niceness

    def __call__(self, worker_id: int) -> None:
        sys.excepthook = _quiet_broken_handoff(sys.excepthook)
        if self.niceness:
            with contextlib.suppress(OSError):
                os.nice(self.niceness)

        def wait() -> None:
            try:
                self.alive_r.recv()  # nothing is ever sent: returns only by EOF
            except (EOFError, OSError):
                pass
            os._exit(0)

        threading.Thread(target=wait, daemon=True, name="exit-with-trainer").start()
