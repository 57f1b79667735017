"""Hand back a big tensor's mapped pages once a pass has gone by, so they do not pile up in RSS.

A mapped input is a private file mapping the engine never writes, and a mapped output is a shared
file mapping whose stores are already in the page cache: unmapping their pages from this process
(MADV_DONTNEED) loses nothing, and a later access faults them back in from the page cache. The
same call would zero anonymous memory, so only ranges inside a mapping of a `.safetensors` file
are ever released; anything else (a buffer read from a remote source, a merged adapter) is kept.
Linux only; elsewhere releasing does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

_MAPPED_SUFFIX = ".safetensors"


def _libc_madvise():
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _libc_madvise()


def drop_pages(address: int, nbytes: int) -> None:
    """Unmap the whole pages inside [address, address + nbytes) of a file mapping (the caller
    knows it is one). Partial pages at either end stay mapped."""
    if _madvise is None:
        return
    first = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (address + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _madvise(first, last - first, mmap.MADV_DONTNEED)  # advice only: a failure costs memory


def _safetensors_mappings() -> list[tuple[int, int]]:
    """[start, end) of this process's mappings of `.safetensors` files."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n").endswith(_MAPPED_SUFFIX):
                start, end = fields[0].split("-")
                spans.append((int(start, 16), int(end, 16)))
    return spans


class MappedPages:
    """Equally long 1-D arrays (W, F, the output) released together, range by range; only the
    ones that lie inside a `.safetensors` file mapping are touched."""

    def __init__(self, *arrays: np.ndarray) -> None:
        spans = _safetensors_mappings() if _madvise is not None else []
        self._mapped = [
            (a.ctypes.data, a.itemsize)
            for a in arrays
            if any(lo <= a.ctypes.data and a.ctypes.data + a.nbytes <= hi for lo, hi in spans)
        ]

    @property
    def mapped(self) -> int:
        """How many of the arrays are file-mapped (and so released)."""
        return len(self._mapped)

    def release(self, start: int, stop: int) -> None:
        """Drop entries [start, stop) of every mapped array from this process's memory."""
        for address, itemsize in self._mapped:
            drop_pages(address + start * itemsize, (stop - start) * itemsize)
