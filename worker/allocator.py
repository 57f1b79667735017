"""glibc malloc settings for the engine's chunk-sized temporaries.

The torch path (dare, breadcrumbs, nps, and any tensor the fused kernel does not take) works in
float32 chunks of 4 Mi entries: each op allocates and frees buffers of 16-32 MiB. glibc serves
those with mmap once its dynamic threshold has grown past them, or returns the top of the heap to
the kernel whenever more than the trim threshold is free, so every chunk's buffers were fresh
pages: faulted in and zeroed by the kernel, then unmapped. On a 0.96 GB bf16 pair that was most
of the run's CPU (system time 13 s of 27 for dare, 21 of 49 for breadcrumbs, 86 of 185 for nps;
bench/RESULTS.md "Allocator"). With buffers up to 64 MiB taken from the heap and up to 256 MiB of
free heap kept, the freed chunk buffers are reused: system time 2.4-5 s, the same bytes, peak RSS
+60-100 MB. Larger allocations (whole tensors, models) still go to mmap and back at free, and a
worker process keeps at most 256 MiB of free heap between jobs.

An operator's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ win (glibc read them at start).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 64 * 2**20
TRIM_THRESHOLD_BYTES = 256 * 2**20


def tune_allocator() -> bool:
    """Apply the settings above to this process (all threads); False where the C library is
    not glibc (mallopt absent) or the operator set them."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Setting either disables glibc's dynamic mmap threshold, so both are fixed from here on.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
