"""The sparse-delta output format: a pruned model stored as what differs from its base.

A prune job with `output_format: "sparse-delta"` writes, for each output tensor O, only the
entries whose BITS differ from the base tensor W it pairs with (W cast to O's dtype, as torch
casts), so that `materialize(W, delta)` gives O back bit for bit for every method, rescaling ones
(nps, dare, scale) included. Per tensor, in safetensors (sharded like a dense output,
`model.safetensors` or `model-0000i-of-0000N.safetensors` with the usual index), one of:

- encoding `mask`: `NAME.__mask__` (U8, `ceil(n / 8)` bytes: `numpy.packbits(changed,
  bitorder="little")` over the row-major flattened shared entries, bit i of byte j is entry
  8j + i) and `NAME.__values__` (O's dtype, the changed entries in flat order);
- encoding `indices`: `NAME.__indices__` (I32, or I64 for tensors of 2**31 entries or more:
  the ascending flat positions of the changed entries) and `NAME.__values__`; chosen where it is
  smaller than the mask (density under 1/32 for I32);
- `NAME.__rows__` besides either, for an embedding or head whose fine-tune added rows: the rows
  past the base's (`base_rows` of them are delta-coded), stored dense;
- encoding `dense`: `NAME` itself, whole, where there is nothing to differ from (a tensor only in
  the fine-tune, a non-float tensor).

`fapm-delta.json` (strict JSON) names the base (URI, revision, the sha256 of each weight file and
its size, as the report identifies inputs), the job's spec and method, the format version, and
per tensor its dtype, shape, encoding, base tensor name, base rows and changed count. The rest of
the directory is a prune output's: side files, card, `pruning_report.json` (whose
`sparse_delta` section gives bytes on disk against the dense output and the fine-tune).

The tensors' encoded parts are known only once each is computed, but a shard's header comes
first in its file: they are appended to a spool file in the staging directory as they come, then
laid out into shards through ShardedWriter when the last one is in (the spool is a few percent of
a dense model at usual densities, and is removed before publishing).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worker.errors import CorruptCheckpoint, FapmError
from worker.io import strict_json
from worker.io.safe_json import JsonLimits, check_size, load_json
from worker.io.safetensors_format import FLOAT_DTYPES, MAX_TENSORS, build_header
from worker.io.torch_tensors import TORCH_DTYPES
from worker.io.writer import (
    PlannedTensor,
    ShardedWriter,
    ShardLayout,
    WrittenShard,
    plan_shards,
    pwrite_all,
)

FORMAT = "fapm-sparse-delta/1"
MANIFEST_FILE = "fapm-delta.json"
MASK_SUFFIX = ".__mask__"
INDICES_SUFFIX = ".__indices__"
VALUES_SUFFIX = ".__values__"
ROWS_SUFFIX = ".__rows__"
ENCODINGS = ("mask", "indices", "dense")
# Hidden in the staging directory while the job runs; removed before anything is published.
SPOOL_FILE = ".fapm-delta-spool"
# A delta's manifest is read from wherever it lies: capped and parsed by the one safe loader.
# About 200 bytes per tensor: room for the largest checkpoints' 200,000 tensors.
MANIFEST_LIMITS = JsonLimits(max_bytes=256 * 2**20, max_depth=16, max_values=16 * 2**20)
# Integer views of each element size: bits are compared and copied, never float values.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class BaseMismatch(FapmError):
    """The base given to materialize is not the one the delta was made against."""

    code = "base_mismatch"


@dataclass(frozen=True)
class Part:
    """One stored tensor of the delta: its name, dtype tag, shape and bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, contiguous

    @property
    def planned(self) -> PlannedTensor:
        return PlannedTensor(self.name, self.dtype, self.shape)


def bits_of(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's elements as integers of the same width (its bit patterns)."""
    return tensor.contiguous().view(_BITS[tensor.element_size()])


def base_shape_fits(base_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """O can be coded against W: the same shape, or more rows (added vocabulary) and the same
    other dimensions."""
    return (
        len(base_shape) == len(shape) >= 1
        and base_shape[1:] == shape[1:]
        and shape[0] >= base_shape[0]
    ) or (base_shape == shape == ())


def encode(
    name: str, out: torch.Tensor, base: torch.Tensor | None
) -> tuple[list[Part], dict[str, object]]:
    """The parts that store `out` (CPU, contiguous) against `base` (W, any float dtype, or None:
    dense), and its manifest entry (without name, dtype and shape)."""
    if base is None:
        return [_part(name, out)], {"encoding": "dense"}
    rows = base.shape[0] if base.dim() else None
    shared = out[:rows] if rows is not None else out
    w = base.to(out.dtype)  # torch's cast, which materialize repeats
    o_bits, w_bits = bits_of(shared).reshape(-1), bits_of(w).reshape(-1)
    changed = o_bits != w_bits
    values = shared.reshape(-1)[changed]
    n, k = changed.numel(), int(values.numel())
    index_dtype = torch.int32 if n < 2**31 else torch.int64
    parts: list[Part]
    if k * index_dtype.itemsize < math.ceil(n / 8):
        encoding = "indices"
        indices = torch.nonzero(changed).reshape(-1).to(index_dtype)
        parts = [_part(name + INDICES_SUFFIX, indices)]
    else:
        encoding = "mask"
        mask = np.packbits(changed.numpy(), bitorder="little")
        parts = [Part(name + MASK_SUFFIX, "U8", (len(mask),), mask)]
    del changed
    parts.append(_part(name + VALUES_SUFFIX, values))
    if rows is not None and out.shape[0] > rows:
        parts.append(_part(name + ROWS_SUFFIX, out[rows:]))
    entry: dict[str, object] = {"encoding": encoding, "changed": k, "shared": n}
    if rows is not None:
        entry["base_rows"] = rows
    return parts, entry


def decode(
    entry: dict[str, object],
    parts: Callable[[str], torch.Tensor],
    base: torch.Tensor | None,
    where: str,
) -> torch.Tensor:
    """O rebuilt from its manifest `entry` (validated by `tensor_entries`), `parts(suffix)` (the
    stored tensor NAME+suffix) and W. CorruptCheckpoint where the stored parts do not fit."""
    name, dtype = str(entry["name"]), TORCH_DTYPES[str(entry["dtype"])]
    shape = tuple(entry["shape"])  # type: ignore[arg-type]
    if entry["encoding"] == "dense":
        out = parts("")
        _expect(out, dtype, shape, f"{where}: {name!r}")
        return out
    if base is None:
        raise CorruptCheckpoint(f"{where}: {name!r} is coded against a base tensor it lacks")
    rows = base.shape[0] if base.dim() else None
    if not base_shape_fits(tuple(base.shape), shape):
        raise BaseMismatch(
            f"{where}: {name!r} has shape {list(shape)}, the base tensor "
            f"{list(base.shape)}: not the base this delta was made against"
        )
    out = torch.empty(shape, dtype=dtype)
    shared = out[:rows] if rows is not None else out
    shared.copy_(base.to(dtype))
    flat = bits_of(shared).reshape(-1)  # a view of `out`
    values = parts(VALUES_SUFFIX)
    if values.dtype != dtype or values.dim() != 1:
        raise CorruptCheckpoint(f"{where}: {name!r}{VALUES_SUFFIX} is not a {dtype} vector")
    if entry["encoding"] == "mask":
        mask = parts(MASK_SUFFIX)
        if mask.dtype != torch.uint8 or tuple(mask.shape) != (math.ceil(flat.numel() / 8),):
            raise CorruptCheckpoint(f"{where}: {name!r}{MASK_SUFFIX} does not fit the tensor")
        bits = np.unpackbits(mask.numpy(), count=flat.numel(), bitorder="little")
        changed = torch.from_numpy(bits.view(np.bool_))
        if int(changed.sum()) != values.numel():
            raise CorruptCheckpoint(f"{where}: {name!r}: the mask and the values disagree")
        flat[changed] = bits_of(values)
    else:
        indices = parts(INDICES_SUFFIX)
        if indices.dtype not in (torch.int32, torch.int64) or tuple(indices.shape) != tuple(
            values.shape
        ):
            raise CorruptCheckpoint(f"{where}: {name!r}: the indices and the values disagree")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= flat.numel()):
            raise CorruptCheckpoint(f"{where}: {name!r}{INDICES_SUFFIX} out of range")
        flat[indices.to(torch.int64)] = bits_of(values)
    if rows is not None and shape[0] > rows:
        added = parts(ROWS_SUFFIX)
        _expect(added, dtype, (shape[0] - rows, *shape[1:]), f"{where}: {name!r}{ROWS_SUFFIX}")
        out[rows:].copy_(added)
    return out


def _expect(tensor: torch.Tensor, dtype: torch.dtype, shape: tuple, where: str) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        raise CorruptCheckpoint(
            f"{where}: stored {tensor.dtype} {list(tensor.shape)}, the manifest says "
            f"{dtype} {list(shape)}"
        )


def _tag(dtype: torch.dtype) -> str:
    return {v: k for k, v in TORCH_DTYPES.items()}[dtype]


def _part(name: str, tensor: torch.Tensor) -> Part:
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return Part(name, _tag(tensor.dtype), tuple(tensor.shape), data)


def read_manifest(source) -> dict:
    """The delta's manifest from its source, checked for the fields materialize relies on
    (CorruptCheckpoint otherwise; SourceNotFound-like error where there is none)."""
    where = f"{source.uri.rstrip('/')}/{MANIFEST_FILE}"
    if MANIFEST_FILE not in source.files():
        raise CorruptCheckpoint(f"{source.uri}: no {MANIFEST_FILE}: not a fapm sparse delta")
    check_size(source.size(MANIFEST_FILE), where, MANIFEST_LIMITS, CorruptCheckpoint)
    manifest = load_json(source.read_file(MANIFEST_FILE), where, MANIFEST_LIMITS, CorruptCheckpoint)
    assert isinstance(manifest, dict)
    if manifest.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{where}: format {manifest.get('format')!r}, not {FORMAT!r}")
    base = manifest.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("shards"), dict):
        raise CorruptCheckpoint(f"{where}: no base shards")
    if not isinstance(base.get("sizes"), dict):
        raise CorruptCheckpoint(f"{where}: no base sizes")
    tensor_entries(manifest, where)
    return manifest


def tensor_entries(manifest: dict, where: str) -> list[dict]:
    """The manifest's tensor entries, each checked (names, dtypes, shapes, encodings)."""
    entries = manifest.get("tensors")
    if not isinstance(entries, list):
        raise CorruptCheckpoint(f"{where}: no tensors list")
    for i, entry in enumerate(entries):
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and entry.get("dtype") in TORCH_DTYPES
            and isinstance(entry.get("shape"), list)
            and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"]
            )
            and entry.get("encoding") in ENCODINGS
            and (entry.get("encoding") == "dense" or isinstance(entry.get("base"), str))
        )
        if not ok:
            raise CorruptCheckpoint(f"{where}: tensors[{i}] is malformed")
    return entries


def shard_size_of(manifest: dict, default: int) -> int:
    """The delta's job's shard size: materialize lays out the same shards as its dense output."""
    size = (manifest.get("spec") or {}).get("shard_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else default


def layout_bytes(shards: list[ShardLayout], metadata: dict[str, str] | None = None) -> int:
    """Bytes on disk of planned shards (headers and data), as ShardedWriter writes them."""
    total = 0
    for shard in shards:
        header, _ = build_header(
            [(t.name, t.dtype, t.shape) for t in shard.tensors],
            {"format": "pt", **(metadata or {})},
        )
        total += len(header) + shard.nbytes
    return total


def plan_delta_shards(parts: list[PlannedTensor], max_shard_bytes: int) -> list[ShardLayout]:
    """plan_shards, with no shard over the safetensors readers' cap on tensors per file (a
    delta stores up to three parts per tensor, in a few percent of a dense shard's bytes)."""
    limit = max_shard_bytes
    while True:
        shards = plan_shards(parts, limit)
        if all(len(s.tensors) <= MAX_TENSORS for s in shards) or limit <= 1:
            return shards
        limit //= 2


class SparseDeltaWriter:
    """The prune pipeline's writer for a sparse-delta output (the surface of ShardedWriter that
    WriterThread drives): `write(name, O's bytes)` in plan order codes O against its base tensor,
    read here from the base reader, and spools the parts; `finish` lays them out in shards,
    writes the manifest and returns the shards written; `destination` never maps (the pruner
    computes into its own buffer)."""

    def __init__(
        self,
        directory: Path,
        tasks: list,
        base,
        name_map,
        spec,
        on_shard_complete: Callable[[WrittenShard], None] | None = None,
    ) -> None:
        self.directory = directory
        self.tasks = {t.name: t for t in tasks}
        self.base = base
        self.name_map = name_map
        self.spec = spec
        self.on_shard_complete = on_shard_complete
        self.dense_planned = [t.planned for t in tasks]
        self._base_names = set(base.names())
        self._spool_path = directory / SPOOL_FILE
        self._spool = os.open(self._spool_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._spooled = 0
        self._parts: list[tuple[PlannedTensor, int]] = []  # (part, offset in the spool)
        self._entries: list[dict[str, object]] = []
        self._writer: ShardedWriter | None = None
        self.written: list[WrittenShard] = []

    def _base_tensor_name(self, task) -> str | None:
        """The base tensor O is coded against, or None (stored dense)."""
        if task.out_dtype not in FLOAT_DTYPES:
            return None
        name = task.base_name
        if name is None:  # a copied tensor (excluded, ...) that the base has too
            mapped = self.name_map.base_name(task.name)
            name = mapped if mapped in self._base_names else None
        if name is None:
            return None
        info = self.base.info(name)
        if info.dtype not in FLOAT_DTYPES or not base_shape_fits(info.shape, task.shape):
            return None
        return name

    def destination(self, name: str, populate: bool = False) -> None:
        return None

    def write(self, name: str, data: object) -> None:
        task = self.tasks[name]
        raw = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        out = torch.from_numpy(raw).view(TORCH_DTYPES[task.out_dtype]).reshape(task.shape)
        base_name = self._base_tensor_name(task)
        w = self.base.read(base_name) if base_name is not None else None
        parts, entry = encode(name, out, w)
        del w
        for part in parts:
            pwrite_all(self._spool, memoryview(part.data), self._spooled)
            self._parts.append((part.planned, self._spooled))
            self._spooled += part.data.nbytes
        self._entries.append(
            {
                "name": name,
                "dtype": task.out_dtype,
                "shape": list(task.shape),
                "base": base_name,
                **entry,
            }
        )

    def finish(self) -> list[WrittenShard]:
        """Lay the spooled parts out in shards (ShardedWriter), write the manifest, remove the
        spool; returns the shards written."""
        shards = plan_delta_shards([p for p, _ in self._parts], self.spec.shard_size)
        self._writer = ShardedWriter(
            self.directory, shards, on_shard_complete=self.on_shard_complete
        )
        spool = _map(self._spool, self._spooled)
        try:
            for planned, offset in self._parts:
                self._writer.write(planned.name, spool[offset : offset + planned.nbytes])
            self.written = self._writer.finish()
        finally:
            del spool
            self._close_spool()
        manifest = {
            "format": FORMAT,
            "base": self._base_identity(),
            "method": self.spec.method,
            "sparsity": self.spec.sparsity,
            "spec": self.spec.model_dump(mode="json"),
            "encoding": {
                "mask": "numpy.packbits(bitorder='little') of the flat changed entries",
                "suffixes": {
                    "mask": MASK_SUFFIX,
                    "indices": INDICES_SUFFIX,
                    "values": VALUES_SUFFIX,
                    "rows": ROWS_SUFFIX,
                },
            },
            "tensors": self._entries,
        }
        (self.directory / MANIFEST_FILE).write_text(strict_json.dumps(manifest) + "\n")
        return self.written

    def _base_identity(self) -> dict[str, object]:
        identity = self.base.identity()
        source = self.base.source
        files = self.base.checkpoint.files
        return {**identity, "sizes": {f: source.size(f) for f in files}}

    def summary(self, finetuned_bytes: int | None) -> dict[str, object]:
        """Bytes on disk of the delta's weights against the dense output and the fine-tune's
        weights (the report's `sparse_delta` section)."""
        delta = sum(s.size for s in self.written)
        dense = layout_bytes(plan_shards(self.dense_planned, self.spec.shard_size))
        counts = {e: sum(1 for t in self._entries if t["encoding"] == e) for e in ENCODINGS}
        return {
            "format": FORMAT,
            "manifest": MANIFEST_FILE,
            "bytes": delta,
            "dense_output_bytes": dense,
            "ratio_to_dense_output": delta / dense if dense else None,
            "finetuned_bytes": finetuned_bytes,
            "ratio_to_finetuned": delta / finetuned_bytes if finetuned_bytes else None,
            "tensors_by_encoding": counts,
        }

    def _close_spool(self) -> None:
        if self._spool >= 0:
            os.close(self._spool)
            self._spool = -1
            self._spool_path.unlink(missing_ok=True)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        self._close_spool()


def _map(fd: int, size: int) -> memoryview:
    if size == 0:
        return memoryview(b"")
    return memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))


def weight_bytes(reader) -> int | None:
    """Bytes of a fine-tuned checkpoint's weight files (its size on disk); None for a reader that
    is no one checkpoint (an adapter merged on its base, a merge of several)."""
    checkpoint, source = getattr(reader, "checkpoint", None), getattr(reader, "source", None)
    if checkpoint is None or source is None or hasattr(reader, "modules"):  # LoRA: no dense size
        return None
    return sum(source.size(f) for f in checkpoint.files)
