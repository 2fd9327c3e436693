"""glibc malloc settings for PyTorch on CPU: keep freed activation blocks for reuse instead of handing them
back to the OS and page-faulting them in again on the next step.

By default glibc serves blocks above a (dynamic) size threshold with fresh mmap'd pages and trims the free top
of its heap back to the OS, so a world step that allocates and frees the same few-megabyte activations every
call can fault them in every call. Measured on 2 cores (tiny world): 1,600-3,060 minor page faults per step
by default, 0-6 with these settings; a `bench/bench_models.py --preset tiny --skip-training --batches 1,8
--repeats 30` run faulted 1.1-2.1 M pages by default and ~100 k with them, and one cold process in three
stepped a world at ~20 frames/s instead of ~25.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit; bigger blocks are still mmap'd
TRIM_THRESHOLD = 512 * 2**20  # up to this much freed memory stays in the process for reuse

# The environment variables an operator can set instead (glibc reads them at start-up; we then leave malloc alone).
MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Apply the settings to this process (Linux with glibc; elsewhere, or when the environment already tunes
    malloc, nothing changes). Returns whether they were applied. Call once, early, from a process's entry point."""
    if any(name in os.environ for name in MALLOC_ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator behaves differently
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
