"""What a pruning method is: a small pure function from (W, D) to a keep mask.

Methods do math only. The stream loop owns I/O, devices and memory; `compose.py` turns the mask
into output bytes. Inputs are float32 tensors of shape (rows, cols): one row for tensor scope,
the tensor's rows for row scope; k is per row.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from worker.engine.select import keep_count, order_keys, top_k_mask


@dataclass(frozen=True)
class MethodParams:
    """The JobSpec's method parameters, plus the tensor's name (it seeds random methods)."""

    sparsity: float
    alpha: float = 1.0
    gamma: float = 0.01
    seed: int = 0
    tensor_name: str = ""
    # nps: one weight per band (None: all 1), the band edges as rank fractions (None: the
    # default bands at this sparsity), and the rescale of the kept, re-weighted update.
    weights: tuple[float, ...] | None = None
    edges: tuple[float, ...] | None = None
    lam: float = 1.0

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity


class PruningMethod(ABC):
    name: str
    title: str
    paper_url: str | None = None
    # True when kept updates are rescaled, so output = cast(W + factor * D) instead of a select.
    rescales: bool = False

    @abstractmethod
    def mask(self, w: torch.Tensor, d: torch.Tensor, params: MethodParams) -> torch.Tensor:
        """Bool keep-mask, same shape as `d`."""

    def update_factor(self, params: MethodParams) -> float:
        """Multiplier on kept updates (1.0 for methods that only select)."""
        return 1.0

    def select(
        self, w: torch.Tensor, d: torch.Tensor, params: MethodParams
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(keep-mask, per-entry float32 multipliers on kept updates or None).

        None: the scalar `update_factor` applies to every kept entry (every method but nps).
        """
        return self.mask(w, d, params), None


class ScoredMethod(PruningMethod):
    """Keep the exact top-k by a float32 score, ties to the lower index."""

    @abstractmethod
    def scores(self, w: torch.Tensor, d: torch.Tensor, params: MethodParams) -> torch.Tensor:
        """float32 scores, same shape as `d`; higher is kept first."""

    def mask(self, w: torch.Tensor, d: torch.Tensor, params: MethodParams) -> torch.Tensor:
        k = keep_count(d.shape[-1], params.density)
        if k == d.shape[-1]:  # sparsity 0 (a merge's pass-through): no scores to rank
            return torch.ones_like(d, dtype=torch.bool)
        return top_k_mask(order_keys(self.scores(w, d, params)), k)


_RANDOM_CHUNK = 1 << 20


def draw_generator(params: MethodParams, skip: int = 0) -> np.random.Generator:
    """The tensor's stream of uniform draws, seeded by (seed, tensor name), `skip` draws in:
    PCG64 gives one 64-bit output per float64 draw, and `advance` skips them unread."""
    seed_seq = np.random.SeedSequence([params.seed, zlib.crc32(params.tensor_name.encode())])
    bit_generator = np.random.PCG64(seed_seq)
    bit_generator.advance(skip)
    return np.random.Generator(bit_generator)


def uniform_draws(params: MethodParams, n: int) -> np.ndarray:
    """n uniform float64 draws in [0, 1), a pure function of (seed, tensor name, index).

    numpy's PCG64 stream is fixed for a given seed, and drawing float64 in chunks gives the same
    values as one large draw, so any implementation can reproduce the mask exactly.
    """
    generator = draw_generator(params)
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, _RANDOM_CHUNK):
        stop = min(n, start + _RANDOM_CHUNK)
        out[start:stop] = generator.random(stop - start)
    return out
