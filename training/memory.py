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


def _trim() -> Any:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
        except OSError:
            lib = None
        _libc = getattr(lib, "malloc_trim", False) if lib is not None else False  # False: not glibc
    return _libc


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
