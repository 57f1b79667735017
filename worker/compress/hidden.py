"""The calibration hidden states between two layers, held once: in memory while they fit a
budget, else in a file on disk (a memory map the kernel pages in and out).

Sequences differ in length, so each is stored as its own (tokens, hidden) float32 block. A layer
reads the inputs of one store and writes its outputs to another; the two swap after each layer.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from worker.evaluation.candidates import available_host_memory
from worker.spec import parse_byte_size

BUDGET_ENV = "FAPM_CALIBRATION_BUDGET"
DEFAULT_BUDGET = "25%"  # of the host's available memory, for both stores together


def hidden_budget(value: str | None = None) -> int:
    """Bytes the two hidden-state stores may take in memory: a byte size or a percentage."""
    raw = (value if value is not None else os.environ.get(BUDGET_ENV, "")).strip()
    raw = raw or DEFAULT_BUDGET
    try:
        if raw.endswith("%"):
            return int(float(raw[:-1]) / 100 * available_host_memory())
        return 0 if raw == "0" else parse_byte_size(raw)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}: {raw!r} is neither a byte size nor a percentage") from None


class HiddenStates:
    """Per-sequence (tokens, hidden) float32 blocks, in memory or in one file on disk."""

    def __init__(self, lengths: list[int], hidden: int, on_disk: bool, directory: Path) -> None:
        self.lengths = lengths
        self.hidden = hidden
        self.offsets = np.cumsum([0, *lengths]).tolist()
        self.on_disk = on_disk
        self._blocks: list[torch.Tensor | None] = [None] * len(lengths)
        self._file: np.memmap | None = None
        if on_disk:
            handle, name = tempfile.mkstemp(prefix="fapm-hidden-", suffix=".f32", dir=directory)
            os.close(handle)
            self.path = Path(name)
            shape = (max(1, self.offsets[-1]), hidden)
            self._file = np.memmap(self.path, dtype=np.float32, mode="w+", shape=shape)

    @property
    def nbytes(self) -> int:
        return self.offsets[-1] * self.hidden * 4

    def put(self, index: int, block: torch.Tensor) -> None:
        block = block.reshape(self.lengths[index], self.hidden).to(torch.float32)
        if self._file is None:
            self._blocks[index] = block.clone()
        else:
            self._file[self.offsets[index] : self.offsets[index + 1]] = block.numpy()

    def get(self, index: int) -> torch.Tensor:
        """(1, tokens, hidden) float32."""
        if self._file is None:
            block = self._blocks[index]
            assert block is not None
            return block[None]
        rows = self._file[self.offsets[index] : self.offsets[index + 1]]
        return torch.from_numpy(np.array(rows))[None]

    def close(self) -> None:
        """Drop the blocks (and the file); `nbytes` and `on_disk` stay readable."""
        self._blocks = [None] * len(self.lengths)
        if self._file is not None:
            del self._file
            self._file = None
            self.path.unlink(missing_ok=True)


def hidden_stores(
    lengths: list[int], hidden: int, budget: int, directory: Path
) -> tuple[HiddenStates, HiddenStates]:
    """Two stores (a layer's inputs and outputs): in memory when both fit the budget."""
    nbytes = sum(lengths) * hidden * 4
    on_disk = 2 * nbytes > budget
    return (
        HiddenStates(lengths, hidden, on_disk, directory),
        HiddenStates(lengths, hidden, on_disk, directory),
    )
