"""glibc keeps what a training step frees (minirbt.host_memory), instead of handing it back to the kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

STEPS = r"""
import ctypes, json, torch
from minirbt.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory()
class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def step():  # a step's worth of activations, 1-24 MB each, made and freed
    xs = [torch.ones(int(n)) for n in (5e6, 2e6, 6e6, 1e6, 3e5, 4e6)]
    ys = [x * 2 for x in xs]
    del xs
    return sum(float(y[0]) for y in ys)
for _ in range(5):
    step()
info = libc.mallinfo2()
print(json.dumps({"applied": applied, "free_in_heap_mb": info.fordblks / 2**20, "mapped_mb": info.hblkhd / 2**20}))
"""


def _run(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, check=True,
                         env=dict(os.environ, **env))
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_freed_step_memory_stays_in_the_process_and_the_user_can_opt_out():
    kept, stock = _run(), _run(MINIRBT_KEEP_HOST_MEMORY="0")
    assert kept["applied"] and not stock["applied"]
    # a step frees ~150 MB: kept, it waits in the heap for the next step (no fresh pages to fault in); stock glibc
    # trims it back to the kernel, and the next step faults it in again (~700,000 page faults for 20 steps here)
    assert kept["free_in_heap_mb"] > 100 and stock["free_in_heap_mb"] < 20, (kept, stock)
    assert kept["mapped_mb"] < 10  # blocks of up to 24 MB come from the heap, not from mmap
    assert not _run(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")["applied"]  # the user's tunables win
