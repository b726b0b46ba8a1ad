"""A steady allocator for the timing benchmarks.

glibc's malloc hands freed blocks above its mmap threshold back to the operating system, so every training step
faults its large feature maps back in and the kernel zeroes each page again. How many blocks take that path depends
on the process's allocation history, which made the same step swing by up to 50% between runs (Conv-4 plain step:
60 to 92 ms). With malloc told to keep what it frees, both sides of a ratio run in the steady state a long training
run reaches, and the ratio measures the computation.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> str:
    """Ask glibc to serve blocks up to 32 MiB from its heap and never trim it; returns a line saying what was set."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "allocator: default (no glibc mallopt)"
    if mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 1 << 30):
        return "allocator: glibc keeps freed memory (mmap threshold 32 MiB, no trim)"
    return "allocator: default (mallopt refused)"
