"""The training process's memory: its peak so far, and handing freed heap pages back.

glibc keeps what a process frees for its next allocations. After the one pass over millions of
interactions, and between the large score blocks of an evaluation over a 1M-item catalogue, those
pages are free but still resident: measured at 5M users (BENCHMARKS.md), the resident set grew by
1.4 GB over one test evaluation whose live heap stayed flat. ``malloc_trim`` returns them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from typing import Any

_libc: Any = None

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20   # glibc's largest: blocks under it come from the heap and are reused
TRIM_THRESHOLD = 256 << 20  # free memory at the heap's top handed back by itself only above this


def _glibc() -> Any:
    """The C library when it is glibc (it has ``malloc_trim``), else None."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
        except OSError:
            lib = None
        _libc = lib if lib is not None and hasattr(lib, "malloc_trim") else False  # False: not glibc
    return _libc or None


def _trim() -> Any:
    lib = _glibc()
    return lib.malloc_trim if lib is not None else None


def reuse_freed_blocks() -> bool:
    """Make glibc keep the blocks a training step frees for the next step's allocations.

    A step allocates and frees the same few-MB tensors every time ((batch, history, dim) blocks
    and their gradients). By default glibc serves such a block with a fresh ``mmap`` once it is
    over its (adaptive) threshold, or trims the heap's top after a free, so the next step's block
    arrives as new pages and its first writes are page faults, more time than its arithmetic. With
    blocks under 32 MB kept in the heap and the top trimmed only above 256 MB, the attention
    encoder's forward + backward at 512 x 50 x 64 takes 26.5 instead of 45.9 ms, with 43 instead of
    5,374 faults a step (``python benchmarks/interests.py --repeats 100``, BENCHMARKS.md; an
    earlier run of its ``--loss-only`` part: 23.6 against 41.4 ms).
    ``release_freed_memory`` still hands everything free back where the job asks for it (between
    shards, before an evaluation). Returns whether the settings were applied."""
    lib = _glibc()
    if lib is None:
        return False
    return bool(lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(lib.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_freed_memory(collect: bool = True) -> None:
    """Give the heap's free pages back to the operating system (glibc; elsewhere a no-op)."""
    if collect:
        gc.collect()
    trim = _trim()
    if trim:
        trim(0)
    pa = sys.modules.get("pyarrow")
    if pa is not None:  # Arrow's own allocator (jemalloc / mimalloc) caches freed blocks the same way
        pa.default_memory_pool().release_unused()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB
