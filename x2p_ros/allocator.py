"""glibc's allocator told to keep freed memory for the next allocation.

By default glibc maps every block over its mmap threshold (at most 32 MB) on its own and gives it back to
the kernel when it is freed, so the next array of that size is faulted in again page by page. The data
engine's volumes and DRR lookups and training's activations are such blocks, made and freed at every case
or step. On the 2-core machine of 2026-12-07 those page faults took as long as the work: a 512 x 512
synthetic case 5.5 s against 2.9 s with freed memory kept, a `cpu` training step at batch 4 3.5 s against
2.4 s (commit 00b0baf; the synthesis in docs/BENCHMARKS.md). The command line and the benchmarks call
keep_freed_memory() first; the ROS node keeps glibc's default, as a process that runs for days should
give memory back."""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, glibc's malloc.h
TRIM_THRESHOLD = 2 ** 31 - 1  # bytes free at the heap's top before it is given back: the most mallopt takes


def keep_freed_memory() -> bool:
    """Every block from the heap, and the heap's free top kept: True where glibc took both settings,
    False elsewhere (another C library, no mallopt), where nothing changes."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
