"""The thin torch adapter over the byte layer: safetensors dtype tags <-> torch dtypes, and reading
a tensor straight into a torch tensor (one copy: file -> tensor storage)."""

from __future__ import annotations

import numpy as np
import torch

from worker.io.checkpoint import SafetensorsCheckpoint

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
}
DTYPE_TAGS: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

# dtypes the pruning math computes on (it reads them exactly into float32).
COMPUTE_DTYPES = frozenset({"F16", "BF16", "F32"})


def read_tensor(checkpoint: SafetensorsCheckpoint, name: str) -> torch.Tensor:
    """Read one tensor in its stored dtype and shape, on the CPU.

    A local file is mapped, not copied: the tensor's storage is the page cache itself, which
    saves a copy and the page faults of a fresh buffer for every tensor. Other sources (and a
    mapping whose bytes are not aligned for the dtype) read into a fresh buffer.
    """
    entry = checkpoint.entry(name)
    mapped = checkpoint.map(name) if entry.nbytes else None
    if mapped is not None:
        itemsize = TORCH_DTYPES[entry.dtype].itemsize
        aligned = np.frombuffer(mapped, dtype=np.uint8).ctypes.data % itemsize == 0
        return tensor_over(mapped if aligned else bytearray(mapped), entry.dtype, entry.shape)
    raw = torch.empty(entry.nbytes, dtype=torch.uint8)
    if entry.nbytes:
        checkpoint.read_into(name, memoryview(raw.numpy()))
    return raw.view(TORCH_DTYPES[entry.dtype]).reshape(entry.shape)


def tensor_over(
    buffer: memoryview | bytearray, dtype_tag: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """A tensor whose storage is `buffer` (a mapped input or its place in a mapped output file);
    numpy keeps the buffer, and so the mapping, alive for as long as the tensor lives."""
    raw = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8))
    return raw.view(TORCH_DTYPES[dtype_tag]).reshape(shape)
