"""The sharded safetensors writer.

The whole layout (which tensor goes in which shard, every header) is planned up front from the
output's names, dtypes and shapes, so each shard file is final the moment its last tensor is
written: it can be uploaded while the next one is computed, and its name never changes.
Tensors are written straight to their place in the file: no output shard is buffered in memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import math
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from worker.io.resident import MappedPages, drop_pages
from worker.io.safetensors_format import DTYPE_SIZES, build_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range, do not wait for it


def _linux_file_calls() -> tuple[Callable | None, Callable | None]:
    """libc's fallocate and sync_file_range where the platform has them (Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fallocate, sync_file_range = libc.fallocate, libc.sync_file_range
    except (OSError, AttributeError):
        return None, None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fallocate, sync_file_range


_FALLOCATE, _SYNC_FILE_RANGE = _linux_file_calls()


def preallocate(fd: int, size: int) -> bool:
    """Reserve a file's blocks up front; False where the filesystem cannot (plain writes then
    allocate as they go, and fail with ENOSPC as usual).

    On ext4 this makes the writes that follow about 3x cheaper than letting every page allocate
    its block as it is written (bench/RESULTS.md). Not os.posix_fallocate: glibc emulates that
    by writing zeros where the filesystem lacks fallocate, which would double the writes.
    """
    if _FALLOCATE is None or size <= 0:
        return False
    return _FALLOCATE(fd, 0, 0, size) == 0  # EOPNOTSUPP, ENOSPC: plain writes will say so


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start flushing a written range now, without waiting for it, so the disk
    works while the next tensors compute and the shard's final fsync has little left to do."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors tag
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass
class ShardLayout:
    file: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class WrittenShard:
    file: str
    size: int
    sha256: str


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[ShardLayout]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` of tensor data.

    Same rule as huggingface_hub's `split_torch_state_dict_into_shards`: a tensor starts a new shard
    when it would overflow the current one; a tensor larger than the limit gets a shard alone.
    Names follow the HF convention: `model.safetensors` alone, else `model-0000i-of-0000N`.
    """
    shards: list[ShardLayout] = []
    current = ShardLayout(file="")
    for tensor in tensors:
        if current.tensors and current.nbytes + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current = ShardLayout(file="")
        current.tensors.append(tensor)
    if current.tensors or not shards:
        shards.append(current)
    if len(shards) == 1:
        shards[0].file = SINGLE_FILE
    else:
        for i, shard in enumerate(shards, start=1):
            shard.file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    return shards


def index_json(shards: list[ShardLayout]) -> dict[str, object] | None:
    """The `model.safetensors.index.json` content, or None for a single file."""
    if len(shards) == 1:
        return None
    return {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {t.name: s.file for s in shards for t in s.tensors},
    }


class _ShardFile:
    """One open output shard: its descriptor, the running sha256 and whether it can be mapped.

    The file is created at its final size (header written, data blocks reserved) so any planned
    tensor can be placed at its offset; the hash is still fed in plan order, by the writer.
    """

    def __init__(self, path: Path, header: bytes, data_bytes: int) -> None:
        self.path = path
        self.header_len = len(header)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            # Mapping is only safe over reserved blocks: a store into a mapped hole that finds
            # the disk full kills the process (SIGBUS) instead of raising ENOSPC.
            self.mappable = preallocate(self.fd, len(header) + data_bytes)
            pwrite_all(self.fd, memoryview(header), 0)
        except BaseException:
            os.close(self.fd)
            raise
        self.hasher = hashlib.sha256(header)

    def map(self, begin: int, nbytes: int) -> memoryview:
        """A shared, writable view of data bytes [begin, begin + nbytes): stores land in the file."""
        offset = self.header_len + begin
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(self.fd, offset + nbytes - start, offset=start)  # MAP_SHARED
        return memoryview(mapped)[offset - start :]

    def close(self) -> int:
        os.fsync(self.fd)
        size = os.fstat(self.fd).st_size
        os.close(self.fd)
        self.fd = -1
        return size


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):  # a write may be short
        done += os.pwrite(fd, view[done:], offset + done)


def _address(data: object) -> int:
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8).ctypes.data


_WINDOW = 16 * 2**20


def _store(shard: _ShardFile, view: memoryview, offset: int, in_place: bool) -> None:
    """Write `view` at `offset` (unless it was computed there, in place) and feed it to the
    shard's hash, in windows whose mapped pages are handed back behind: the shard's own (in
    place) or a copied tensor's input mapping. Otherwise a 1 GB tensor would be resident whole."""
    source = None
    if not in_place and len(view) > _WINDOW:
        source = MappedPages(np.frombuffer(view, dtype=np.uint8))  # only if it is a file mapping
    for start in range(0, len(view), _WINDOW):
        part = view[start : start + _WINDOW]
        if not in_place:
            pwrite_all(shard.fd, part, offset + start)
        shard.hasher.update(part)
        if in_place:
            drop_pages(_address(part), len(part))
        elif source is not None:
            source.release(start, start + len(part))


class ShardedWriter:
    """Writes planned shards into `directory`, tensor by tensor, in plan order.

    Two ways to hand over a tensor: `write(name, bytes)` copies them into the file; or
    `destination(name)` first gives a writable view of the tensor's place in the file (where the
    filesystem can reserve the shard's blocks up front), the caller computes straight into it,
    and `write(name, that_view)` then only hashes it and starts its writeback. `destination` may
    be called from another thread than `write` (the compute thread, ahead of the writer thread).

    `on_shard_complete(WrittenShard)` is called as each file is closed (fsynced), e.g. to start its
    upload. Raises ValueError if tensors arrive out of plan order or with the wrong byte count.
    """

    def __init__(
        self,
        directory: Path,
        shards: list[ShardLayout],
        metadata: dict[str, str] | None = None,
        on_shard_complete: Callable[[WrittenShard], None] | None = None,
    ) -> None:
        self.directory = directory
        self.shards = shards
        self.metadata = {"format": "pt", **(metadata or {})}
        self.on_shard_complete = on_shard_complete
        self.written: list[WrittenShard] = []
        self._order = [(i, t) for i, s in enumerate(shards) for t in s.tensors]
        # name -> (shard index, offset in the shard's data, byte count)
        self._places: dict[str, tuple[int, int, int]] = {}
        for index, shard in enumerate(shards):
            begin = 0
            for tensor in shard.tensors:
                self._places[tensor.name] = (index, begin, tensor.nbytes)
                begin += tensor.nbytes
        self._next = 0
        self._open: dict[int, _ShardFile] = {}
        self._destinations: dict[str, memoryview] = {}
        self._lock = threading.Lock()

    def _shard(self, index: int) -> _ShardFile:
        with self._lock:
            shard = self._open.get(index)
            if shard is None:
                layout = self.shards[index]
                header, _ = build_header(
                    [(t.name, t.dtype, t.shape) for t in layout.tensors], self.metadata
                )
                shard = _ShardFile(self.directory / layout.file, header, layout.nbytes)
                self._open[index] = shard
            return shard

    def destination(self, name: str) -> memoryview | None:
        """A writable view of the planned tensor's bytes in its shard file, or None where the
        file cannot be mapped safely (the caller then passes its own buffer to `write`)."""
        index, begin, nbytes = self._places[name]
        shard = self._shard(index)
        if not shard.mappable or nbytes == 0:
            return None
        view = shard.map(begin, nbytes)
        with self._lock:
            self._destinations[name] = view
        return view

    def write(self, name: str, data: bytes | memoryview | object) -> None:
        """Hand over the next tensor's raw little-endian bytes (or its filled destination)."""
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name!r} was not planned (all planned tensors written)")
        shard_index, planned = self._order[self._next]
        if planned.name != name:
            raise ValueError(f"expected tensor {planned.name!r} next, got {name!r}")
        view = memoryview(data).cast("B")
        if len(view) != planned.nbytes:
            raise ValueError(
                f"tensor {name!r}: {len(view)} bytes written, {planned.nbytes} planned"
            )
        shard = self._shard(shard_index)
        offset = shard.header_len + self._places[name][1]
        with self._lock:
            destination = self._destinations.pop(name, None)
        in_place = destination is not None and bool(view)
        in_place = in_place and _address(view) == _address(destination)
        del destination
        _store(shard, view, offset, in_place)
        start_writeback(shard.fd, offset, len(view))
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != shard_index:
            self._close_shard(shard_index)

    def _close_shard(self, index: int) -> None:
        with self._lock:
            shard = self._open.pop(index)
        size = shard.close()
        written = WrittenShard(self.shards[index].file, size, shard.hasher.hexdigest())
        self.written.append(written)
        if self.on_shard_complete is not None:
            self.on_shard_complete(written)

    def finish(self) -> list[WrittenShard]:
        """Check everything planned was written, write the index, and return the shards."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise ValueError(f"output incomplete: tensor {missing!r} was never written")
        if not self._order:  # a model with no tensors still gets its (empty) file
            self._shard(0)
            self._close_shard(0)
        index = index_json(self.shards)
        if index is not None:
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return self.written

    def abort(self) -> None:
        with self._lock:
            shards, self._open = list(self._open.values()), {}
            self._destinations.clear()
        for shard in shards:
            os.close(shard.fd)


class WriterThread:
    """Runs a ShardedWriter on its own thread, so writing, hashing and fsync overlap compute.

    `write` hands over a tensor's bytes (any object exposing the buffer protocol, kept alive
    until written) and returns at once unless one write is already waiting: at most one output is
    queued behind the one being written, which bounds the memory it adds. An error on the writer
    thread is re-raised by the next `write` or by `finish`.
    """

    def __init__(self, writer: ShardedWriter) -> None:
        import queue
        import threading

        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fapm-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self.writer.write(*item)
                except BaseException as exc:
                    self._error = exc
            del item

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def destination(self, name: str) -> memoryview | None:
        """`ShardedWriter.destination`, called on the caller's thread (fill it, then `write` it)."""
        self._raise_if_failed()
        return self.writer.destination(name)

    def write(self, name: str, data: object) -> None:
        self._raise_if_failed()
        self._queue.put((name, data))

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def finish(self) -> list[WrittenShard]:
        """Wait for every queued write, then finish the underlying writer."""
        self._stop()
        self._raise_if_failed()
        return self.writer.finish()

    def abort(self) -> None:
        """Stop after the write in progress (idempotent); the caller removes the files."""
        self._error = self._error or RuntimeError("aborted")
        self._stop()
        self.writer.abort()
