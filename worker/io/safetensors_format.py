"""The safetensors byte layout, read exactly and validated strictly.

A file is: 8 bytes N (u64 little-endian), N bytes of UTF-8 JSON, then the byte buffer. The JSON maps
tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the buffer,
end exclusive) plus an optional "__metadata__" string map. The buffer must be fully covered by the
tensors, without holes or overlaps. See huggingface/safetensors README and `src/tensor.rs`.

This module needs neither torch nor numpy: sources for local disk, S3 and the Hub fetch the header
bytes and tensor byte ranges, and this module tells them where things are.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from worker.errors import CorruptCheckpoint
from worker.io.safe_json import JsonLimits, measure, parse

# The Rust reader's cap (safetensors/src/tensor.rs MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
# Tensors one file may list. Real shards list hundreds to a few thousand (a DeepSeek-V3 shard
# about 1,100, its whole 163-shard checkpoint 92,000); without a cap a header just under
# MAX_HEADER_BYTES lists 1.5M zero-size tensors and costs 1.4 GB and 14-20 s to parse.
MAX_TENSORS = 65_536
# Rank of one tensor (real models use at most 5; torch refuses more than 64 dimensions).
MAX_RANK = 32
# Largest dimension, and largest element count of a shape with its zeros read as ones, so that
# sizes and strides fit an int64 with room to multiply by a dtype's size.
MAX_DIM = 2**62
HEADER_LIMITS = JsonLimits(
    max_bytes=MAX_HEADER_BYTES,
    max_depth=3,  # the header object, a tensor's entry, its shape
    # A rank-2 entry is 5 strings, 3 containers and 6 commas; 16 per tensor leaves room.
    max_values=16 * MAX_TENSORS,
    max_digits=20,  # 2**64 has 20 digits
    note=f" (a safetensors file may list at most {MAX_TENSORS:,} tensors)",
)

# safetensors dtype tag -> bytes per element. Sub-byte and exotic types are rejected upstream by
# the engine if it meets them in a tensor it must compute on; here they are only sized.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"})


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in one safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int  # absolute, exclusive

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, validated header. `tensors` is in buffer order."""

    header_len: int
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def file_size(self) -> int:
        return self.tensors[-1].end if self.tensors else self.data_start


def read_header_length(prefix: bytes, file_size: int, where: str) -> int:
    """Decode the 8-byte length prefix and check it against the file size and the cap."""
    if len(prefix) < 8 or file_size < 8:
        raise CorruptCheckpoint(f"{where}: too short to be a safetensors file ({file_size} bytes)")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER_BYTES:
        raise CorruptCheckpoint(
            f"{where}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
        )
    if 8 + header_len > file_size:
        raise CorruptCheckpoint(
            f"{where}: header length {header_len} runs past the end of the file "
            f"({file_size} bytes): the file is truncated or not safetensors"
        )
    return header_len


def parse_header(header_bytes: bytes, file_size: int, where: str) -> SafetensorsHeader:
    """Parse and validate the JSON header (the N bytes after the length prefix).

    `file_size` is the whole file's size; `where` names the file in error messages.
    Raises CorruptCheckpoint naming the problem.
    """
    header_len = len(header_bytes)
    where = f"{where} header"
    shape = measure(header_bytes, where, HEADER_LIMITS, CorruptCheckpoint)
    # Every entry is an object: count them before building any (the header itself is one more,
    # __metadata__ another).
    if shape.objects - 2 > MAX_TENSORS:
        raise CorruptCheckpoint(
            f"{where}: lists about {shape.objects - 1:,} tensors; a safetensors file may list "
            f"at most {MAX_TENSORS:,}"
        )
    raw = parse(header_bytes, where, CorruptCheckpoint, expect=dict)
    assert isinstance(raw, dict)

    metadata = raw.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptCheckpoint(f"{where}: __metadata__ must map strings to strings")

    data_start = 8 + header_len
    buffer_len = file_size - data_start
    entries = []
    for name, info in raw.items():
        entries.append(_parse_entry(name, info, data_start, buffer_len, where))
    entries.sort(key=lambda e: (e.begin, e.end))

    # The buffer must be covered exactly: no holes, no overlaps, nothing trailing.
    cursor = data_start
    for entry in entries:
        if entry.begin != cursor:
            problem = "overlaps the previous tensor" if entry.begin < cursor else "leaves a hole"
            raise CorruptCheckpoint(
                f"{where}: tensor {_short(entry.name)} at offset {entry.begin - data_start} {problem}"
            )
        cursor = entry.end
    if cursor != file_size:
        raise CorruptCheckpoint(
            f"{where}: tensors cover {cursor - data_start} bytes but the buffer holds "
            f"{buffer_len}: the file is truncated or has trailing bytes"
        )
    return SafetensorsHeader(header_len=header_len, tensors=tuple(entries), metadata=metadata)


def _parse_entry(
    name: str, info: object, data_start: int, buffer_len: int, where: str
) -> TensorEntry:
    if not isinstance(info, dict):
        raise CorruptCheckpoint(f"{where}: entry {_short(name)} is not an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CorruptCheckpoint(f"{where}: tensor {_short(name)} has unknown dtype {_short(dtype)}")
    if not _valid_shape(shape):
        raise CorruptCheckpoint(
            f"{where}: tensor {_short(name)} has an invalid shape {_short(shape)} (a list of at most "
            f"{MAX_RANK} non-negative integers below 2**62 whose product is below 2**62)"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CorruptCheckpoint(
            f"{where}: tensor {_short(name)} has invalid data_offsets {_short(offsets)}"
        )
    begin, end = offsets
    if not 0 <= begin <= end <= buffer_len:
        raise CorruptCheckpoint(
            f"{where}: tensor {_short(name)} data_offsets [{begin}, {end}] are out of range "
            f"(buffer holds {buffer_len} bytes): the file is truncated or its header is wrong"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise CorruptCheckpoint(
            f"{where}: tensor {_short(name)} ({dtype}, shape {_short(shape)}) needs {expected} bytes "
            f"but its offsets span {end - begin}"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _valid_shape(shape: object) -> bool:
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        return False
    if not all(type(d) is int and 0 <= d < MAX_DIM for d in shape):
        return False
    return math.prod(max(d, 1) for d in shape) < MAX_DIM


def _short(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, for messages about values from a file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[tuple[int, int]]]:
    """Lay out a file for `(name, dtype, shape)` in order.

    Returns the 8-byte prefix plus the JSON header, padded with spaces to a multiple of 8 bytes as
    the reference writer does, and each tensor's absolute (begin, end) in the file.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    relative = []
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        relative.append((offset, offset + nbytes))
        offset += nbytes
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)
    start = 8 + len(body)
    return struct.pack("<Q", len(body)) + body, [(start + b, start + e) for b, e in relative]
