"""A safetensors checkpoint (one file or sharded with an index) over any ModelSource.

Only safetensors weights are ever read: pickle checkpoints (`*.bin`, `*.pt`) are refused, never
unpickled. Headers are parsed up front (cheap: a few KB per shard) so the engine can plan the whole
job, including the output's shard layout, before reading a tensor.

Each input shard's sha256 identifies it in the report. A local file is hashed on a thread of its
own, through the page cache, from the moment the checkpoint opens: the engine's mapped reads never
wait for it, and on two cores the hash fills the time the kernel leaves. For other sources it is
computed from the very reads the engine makes when they arrive in file order (the usual case), so
identifying the inputs costs no second read.

`start_early_digests` lets a program start hashing local inputs before it imports the engine
(torch's import takes 1.5-2 s of one core): the job's digest thread then waits for those
results instead of hashing the same file again.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from worker.errors import CorruptCheckpoint, SourceNotFound, UnsupportedFormat
from worker.io import digest_cache
from worker.io.safe_json import JsonLimits, check_size, load_json
from worker.io.safetensors_format import (
    SafetensorsHeader,
    TensorEntry,
    parse_header,
    read_header_length,
)
from worker.io.source import LocalDirSource, ModelSource

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# An index maps each tensor to its shard: three JSON values per tensor, and the largest real
# checkpoints have 100-200 thousand tensors (a 1T-parameter MoE); its metadata is flat.
INDEX_LIMITS = JsonLimits(max_bytes=64 * 2**20, max_depth=8, max_values=4 * 2**20)
# Real configs are a few KB, a dozen levels at most (multimodal configs nest sub-configs).
CONFIG_LIMITS = JsonLimits(max_bytes=16 * 2**20, max_depth=32, max_values=2**20)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HASH_CHUNK = 64 * 2**20
# The digest thread's mapped window: what it adds to the process's resident memory per file.
_MAP_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class TensorLocation:
    file: str
    entry: TensorEntry


class _FileDigest:
    """sha256 of one file, fed by reads that arrive in order; the gaps are read at the end."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.next_offset = 0

    def feed(self, offset: int, data: memoryview) -> None:
        if offset == self.next_offset:
            self.hasher.update(data)
            self.next_offset += len(data)


class _BackgroundDigests:
    """sha256 of whole local files, computed on a daemon thread through mapped 16 MiB chunks (each
    unmapped once hashed, so it holds little memory) unless the machine's digest cache already
    knows the file (io/digest_cache.py); `result()` waits for it."""

    def __init__(self, source: ModelSource, files: list[str]) -> None:
        self._source = source
        self._files = files
        self._digests: dict[str, str] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fapm-input-digests", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for file in self._files:
                before = self._source.stat(file)
                key = None if before is None else digest_cache.file_key(before)
                cached = None if key is None else digest_cache.lookup(key)
                if cached is None and key is not None:
                    cached = _early_result(key, self._stop)
                if cached is not None:
                    self._digests[file] = cached
                    continue
                digest = _hash_mapped(self._source, file, self._stop)
                if digest is None:
                    return  # stopped
                self._digests[file] = digest
                after = self._source.stat(file)
                if key is not None and after is not None and digest_cache.file_key(after) == key:
                    digest_cache.remember(key, digest)  # unchanged while hashed
        except BaseException as exc:  # re-raised by result()
            self._error = exc

    def result(self) -> dict[str, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            raise RuntimeError("input digests were stopped")
        return dict(self._digests)

    def stop(self) -> None:
        self._stop.set()

    def join(self) -> None:
        self._thread.join()


def _hash_mapped(source: ModelSource, file: str, stop: threading.Event | None) -> str | None:
    """sha256 of a whole file through mapped 16 MiB windows, each unmapped once hashed (hashlib
    releases the GIL on them); None if `stop` was set meanwhile."""
    hasher = hashlib.sha256()
    size = source.size(file)
    for offset in range(0, size, _MAP_CHUNK):
        if stop is not None and stop.is_set():
            return None
        chunk = source.map_range(file, offset, min(_MAP_CHUNK, size - offset))
        hasher.update(chunk if chunk is not None else b"")
        del chunk  # unmapped here
    return hasher.hexdigest()


class _EarlyDigest:
    """A digest being computed by `start_early_digests`, for one file key."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.sha256: str | None = None  # None once done: failed or the file changed


_EARLY: dict[str, _EarlyDigest] = {}
_EARLY_LOCK = threading.Lock()


def _early_result(key: str, stop: threading.Event) -> str | None:
    """The early digest of the file with this key (waiting for it), or None if none was started
    or it failed: the caller then hashes the file itself."""
    with _EARLY_LOCK:
        early = _EARLY.get(key)
    if early is None:
        return None
    while not early.done.wait(0.05):
        if stop.is_set():
            return None
    return early.sha256


def start_early_digests(directories: Iterable[str | os.PathLike[str]]) -> None:
    """Start hashing the weight files of these local model directories now, one daemon thread
    per directory, for a job this process is about to run: called before the engine is
    imported (bench/fapm_early.py; proposed for worker/cli.py `_prune`), the hashing overlaps
    that import on a second core.

    Best effort and silent: a directory that is not a local safetensors checkpoint is skipped
    (the job itself reports it). A file is matched to the job's by its digest-cache key
    (device, inode, size, mtime, ctime), checked again once hashed, so a file changed meanwhile
    is hashed again by the job and a different file is never given this digest.
    """
    for directory in directories:
        try:
            source = LocalDirSource(directory)
        except Exception:  # the job reports the problem, with its own message
            continue
        try:
            files = SafetensorsCheckpoint(source).files
            keys = []
            for file in files:
                stat = source.stat(file)
                keys.append(None if stat is None else digest_cache.file_key(stat))
        except Exception:  # the same
            source.close()
            continue
        jobs = []
        with _EARLY_LOCK:
            for file, key in zip(files, keys, strict=True):
                if key is not None and key not in _EARLY:
                    _EARLY[key] = _EarlyDigest()
                    jobs.append((file, key, _EARLY[key]))
        if jobs:
            threading.Thread(
                target=_run_early, args=(source, jobs), name="fapm-early-digests", daemon=True
            ).start()
        else:
            source.close()


def _run_early(source: LocalDirSource, jobs: list[tuple[str, str, _EarlyDigest]]) -> None:
    try:
        for file, key, early in jobs:
            try:
                digest = digest_cache.lookup(key) or _hash_mapped(source, file, None)
                after = source.stat(file)
                if after is not None and digest_cache.file_key(after) == key:
                    early.sha256 = digest
                    digest_cache.remember(key, digest)
            except Exception:  # the job's own thread hashes it and reports
                pass
            finally:
                early.done.set()
    finally:
        source.close()


def parse_index(raw: bytes, where: str) -> dict[str, str]:
    """The weight_map (tensor name -> shard file) of a `model.safetensors.index.json`."""
    index = load_json(raw, where, INDEX_LIMITS, CorruptCheckpoint)
    assert isinstance(index, dict)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(file, str) and file for file in weight_map.values()
    ):
        raise CorruptCheckpoint(
            f"{where}: not a valid index (needs a weight_map of tensor names to file names)"
        )
    return weight_map


def read_config(source: ModelSource) -> dict | None:
    """The model's parsed `config.json`, or None when it has none."""
    if not source.exists(CONFIG_FILE):
        return None
    where = f"{source.uri.rstrip('/')}/{CONFIG_FILE}"
    check_size(source.size(CONFIG_FILE), where, CONFIG_LIMITS, CorruptCheckpoint)
    return parse_config(source.read_file(CONFIG_FILE), where)


def parse_config(raw: bytes, where: str) -> dict:
    """A model's `config.json` as a dict. The nested `text_config` (multimodal models) is read
    the way the top level is, so it must be an object too; `null` reads as absent."""
    config = load_json(raw, where, CONFIG_LIMITS, CorruptCheckpoint)
    assert isinstance(config, dict)
    text_config = config.get("text_config", {})
    if text_config is None:
        del config["text_config"]
    elif not isinstance(text_config, dict):
        raise CorruptCheckpoint(f"{where}: text_config must be an object")
    return config


class SafetensorsCheckpoint:
    """Tensor names -> byte ranges, over one `model.safetensors`, a sharded index, or the single
    `*.safetensors` file of a directory (e.g. `adapter_model.safetensors`)."""

    def __init__(
        self,
        source: ModelSource,
        weights_file: str | None = None,
        hash_in_background: bool = False,
    ) -> None:
        """`hash_in_background`: start hashing local weight files at once (for a job whose
        report names them); otherwise `shard_digests` hashes what the reads did not cover."""
        self.source = source
        self.files = self._weight_files(weights_file)
        self.headers: dict[str, SafetensorsHeader] = {}
        self._digests: dict[str, _FileDigest] = {}
        self._lock = threading.Lock()
        self.tensors: dict[str, TensorLocation] = {}
        for file in self.files:
            header = self._read_header(file)
            self.headers[file] = header
            for entry in header.tensors:
                if entry.name in self.tensors:
                    raise CorruptCheckpoint(
                        f"{source.uri}: tensor {entry.name[:80]!r} appears in both "
                        f"{self.tensors[entry.name].file} and {file}"
                    )
                self.tensors[entry.name] = TensorLocation(file, entry)
        if self._index_map is not None:
            self._check_index(self._index_map)
        self._background = (
            _BackgroundDigests(source, self.files)
            if hash_in_background and source.can_map
            else None
        )

    # -- discovery -------------------------------------------------------------------------

    def _weight_files(self, weights_file: str | None) -> list[str]:
        names = self.source.files()
        self._index_map: dict[str, str] | None = None
        if weights_file is not None:
            if weights_file not in names:
                raise SourceNotFound(f"{self.source.uri}: {weights_file} not found")
            return [weights_file]
        if INDEX_FILE in names:
            where = f"{self.source.uri.rstrip('/')}/{INDEX_FILE}"
            check_size(self.source.size(INDEX_FILE), where, INDEX_LIMITS, CorruptCheckpoint)
            weight_map = parse_index(self.source.read_file(INDEX_FILE), where)
            self._index_map = weight_map
            shard_files = sorted(set(weight_map.values()))
            missing = [f for f in shard_files if f not in names]
            if missing:
                raise SourceNotFound(
                    f"{self.source.uri}: shard {missing[0]} listed in {INDEX_FILE} is missing"
                )
            return shard_files
        if SINGLE_FILE in names:
            return [SINGLE_FILE]
        safetensors = [n for n in names if n.endswith(".safetensors")]
        if len(safetensors) == 1:
            return safetensors
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise UnsupportedFormat(
                f"{self.source.uri}: only pickle weights found ({pickles[0]}); fapm reads "
                "safetensors only and never unpickles untrusted checkpoints. Convert it with "
                "`model.save_pretrained(dir, safe_serialization=True)` on a machine you trust."
            )
        if safetensors:
            raise CorruptCheckpoint(
                f"{self.source.uri}: several .safetensors files but no {INDEX_FILE}"
            )
        raise SourceNotFound(f"{self.source.uri}: no safetensors weights found")

    def _read_header(self, file: str) -> SafetensorsHeader:
        where = f"{self.source.uri.rstrip('/')}/{file}"
        size = self.source.size(file)
        prefix = self.source.read_range(file, 0, min(8, size)) if size else b""
        header_len = read_header_length(prefix, size, where)
        header_bytes = self.source.read_range(file, 8, header_len)
        digest = _FileDigest()
        digest.feed(0, memoryview(prefix))
        digest.feed(8, memoryview(header_bytes))
        self._digests[file] = digest
        return parse_header(header_bytes, size, where)

    def _check_index(self, weight_map: dict[str, str]) -> None:
        for name, file in weight_map.items():
            location = self.tensors.get(name)
            if location is None or location.file != file:
                raise CorruptCheckpoint(
                    f"{self.source.uri}: {INDEX_FILE} places {name[:80]!r} in {file[:80]!r}, "
                    "but that shard does not hold it"
                )

    # -- reading ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Tensor names in storage order (file, then offset): the order that reads fastest."""
        return [n for f in self.files for n in (e.name for e in self.headers[f].tensors)]

    def entry(self, name: str) -> TensorEntry:
        return self.tensors[name].entry

    def read_into(self, name: str, buffer: memoryview) -> None:
        """Read a tensor's raw little-endian bytes into `buffer` (exactly `entry.nbytes` long)."""
        location = self.tensors[name]
        entry = location.entry
        self.source.read_into(location.file, entry.begin, buffer)
        with self._lock:
            self._digests[location.file].feed(entry.begin, buffer)

    def map(self, name: str) -> memoryview | None:
        """A zero-copy view of a tensor's raw bytes where the source can map them, else None."""
        location = self.tensors[name]
        entry = location.entry
        return self.source.map_range(location.file, entry.begin, entry.nbytes)

    def shard_digests(self) -> dict[str, str]:
        """sha256 of every weight file; reads only what the engine's reads did not cover (for a
        remote source whose reads skipped bytes, the store's own digest, e.g. `etag:...`)."""
        if self._background is not None:
            return self._background.result()
        result = {}
        for file in self.files:
            digest = self._digests[file]
            size = self.source.size(file)
            if digest.next_offset < size and self.source.remote:
                # Hashing the unread gaps would download them; a remote store's own digest
                # (S3 ETag, the Hub's LFS sha256) identifies the file instead.
                result[file] = self.source.stored_digest(file)
                continue
            while digest.next_offset < size:
                length = min(_HASH_CHUNK, size - digest.next_offset)
                chunk = self.source.read_range(file, digest.next_offset, length)
                digest.feed(digest.next_offset, memoryview(chunk))
            result[file] = digest.hasher.hexdigest()
        return result

    def close(self) -> None:
        """Stop hashing in the background (a job that failed or was cancelled) and wait for the
        thread, so that it is done with the source before the source closes its files."""
        if self._background is not None:
            self._background.stop()
            self._background.join()

    def total_bytes(self) -> int:
        return sum(loc.entry.nbytes for loc in self.tensors.values())
