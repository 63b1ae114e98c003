"""Keep freed host memory in the process, so training steps stop re-faulting their own activations.

glibc's malloc gives large freed blocks back to the kernel (blocks above its mmap threshold are unmapped, and
the heap top is trimmed past its trim threshold), so every CPU training step asks for its activations again
and touches fresh pages: measured here, 10,000-25,000 page faults per distillation step of the demo's shapes
(RBT6 -> H256, 8 x 128 tokens), and forward 240-450 ms with them vs ~175 ms without. Two ``mallopt``
settings keep what a step frees for the next: blocks up to 32 MiB (glibc's largest mmap threshold) come from
the heap, and the heap is trimmed only past 2 GiB free at its top, so the process holds about its peak.
On CUDA the tensors live in PyTorch's caching allocator and this changes nothing but the host side.

Skipped when glibc is not the C library, and when ``GLIBC_TUNABLES`` already names a malloc setting or
``MINIRBT_KEEP_HOST_MEMORY=0`` (the user's choice wins).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only past 2 GiB of free heap top

_applied: bool | None = None


def keep_freed_host_memory() -> bool:
    """Apply the two settings once per process; True when they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MINIRBT_KEEP_HOST_MEMORY", "1") == "0" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):
            return False  # not glibc (musl, macOS): its allocator behaves otherwise
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        # the mmap threshold first: setting the trim threshold alone would fix the mmap one at its 128 KiB start
        _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except OSError:
        return False
    return _applied
