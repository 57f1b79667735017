"""NPS: band re-weighting of the task vector (arXiv 2505.18713; ALGORITHMS.md "NPS").

The entries' |D| order (descending, ties to the lower flat index: the order of `select.top_k_mask`)
is cut into bands at rank fractions 0 = e_0 < ... < e_M = 1 (`worker.spec.nps.band_edges`). Band b
holds the ranks p with e_b <= p / n < e_{b+1}; in integers, the ranks cut(e_b) <= p < cut(e_{b+1})
with

    cut(e) = #{p in [0, n) : float64(p) / float64(n) < e}

(IEEE division is monotone in p, so that set is a prefix of the ranks; cut(e_0) = 0, and the last
cut is n by definition). The bands come from M - 1 top-k masks at the inner cuts, never a full sort
with int64 indices. T = float32(w_b) * D, and the mask is the exact top k = keep_count(n, 1 - s) of
|T| (computed as float32(w_b) * |D|, the same float32 value), ties to the lower index. A kept entry
is F where c_b = float32(float32(lam) * float32(w_b)) == 1, else cast(float32(W) + c_b * D)
rounded once: `select` returns the mask and the per-entry c_b for `compose_output`.

Scope "model" (`count_model_scope`): the same rules over all pruned tensors in plan order (ties to
the earlier tensor, then the lower index), with the band cuts and the keep threshold found by the
streaming passes of `model_scope.py`; nothing is concatenated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from worker.engine.methods.base import MethodParams, PruningMethod
from worker.engine.model_scope import GlobalThreshold, find_global_thresholds
from worker.engine.select import keep_count, order_keys, top_k_mask
from worker.spec.nps import NpsSpec, band_edges

_INT32_MIN = -(2**31)


def cut_count(n: int, edge: float) -> int:
    """#{p in [0, n) : p / n < edge}, the quotient in float64 (see the module docstring)."""
    if n <= 0 or edge <= 0.0:
        return 0
    c = min(n, max(0, math.ceil(edge * n)))
    # edge * n is rounded too: settle the count on the defining comparison itself.
    while c > 0 and (c - 1) / n >= edge:
        c -= 1
    while c < n and c / n < edge:
        c += 1
    return c


def band_cuts(n: int, edges: Sequence[float]) -> list[int]:
    """The rank cuts 0 = c_0 <= c_1 <= ... <= c_M = n: band b holds ranks c_b <= p < c_{b+1}."""
    return [0, *(cut_count(n, e) for e in edges[1:-1]), n]


def params_edges(params: MethodParams) -> tuple[float, ...]:
    """The band edges of `params`: given, or the default bands at its sparsity."""
    if params.edges is not None:
        return params.edges
    return tuple(band_edges(params.sparsity, NpsSpec()))


def params_weights(params: MethodParams, bands: int) -> tuple[float, ...]:
    """One weight per band: given (their count must match), or all 1 (magnitude)."""
    if params.weights is None:
        return (1.0,) * bands
    if len(params.weights) != bands:
        raise ValueError(f"nps: {len(params.weights)} weights for {bands} bands")
    return params.weights


@dataclass(frozen=True)
class BandTables:
    """float32 per band: the weight w_b (on |D|) and the factor c_b (on the kept update)."""

    weights: torch.Tensor
    factors: torch.Tensor

    @classmethod
    def of(cls, weights: Sequence[float], lam: float) -> BandTables:
        w32 = torch.tensor(list(weights), dtype=torch.float32)
        # c_b = float32(lam) * float32(w_b), one float32 multiplication.
        return cls(w32, torch.tensor(lam, dtype=torch.float32) * w32)

    def to(self, device: torch.device) -> BandTables:
        return BandTables(self.weights.to(device), self.factors.to(device))

    def reweighted_keys(self, band: torch.Tensor, abs_d: torch.Tensor) -> torch.Tensor:
        """int32 order keys of |T| = float32(w_b) * |D|."""
        return order_keys(self.weights.to(abs_d.device)[band.to(torch.int32)] * abs_d)

    def entry_factors(self, band: torch.Tensor) -> torch.Tensor:
        """c_b of each entry (float32, band's shape)."""
        return self.factors.to(band.device)[band.to(torch.int32)]


def tables_of(params: MethodParams, bands: int) -> BandTables:
    return BandTables.of(params_weights(params, bands), params.lam)


def band_ids(abs_keys: torch.Tensor, cuts: Sequence[int]) -> torch.Tensor:
    """uint8 band of each entry from the int32 order keys of |D| (rows, cols), cuts per row:
    the number of inner cuts c with the entry's rank p >= c, from one top-k mask per cut."""
    band = torch.zeros(abs_keys.shape, dtype=torch.uint8, device=abs_keys.device)
    for c in cuts[1:-1]:
        band += ~top_k_mask(abs_keys, c)
    return band


def abs_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """|D| back from its order keys (a non-negative float's key is its bits; NaN is INT32_MIN)."""
    abs_d = keys.view(torch.float32)
    return abs_d.masked_fill(keys == _INT32_MIN, float("nan"))


class Nps(PruningMethod):
    name = "nps"
    title = "NPS (Neural Parameter Search: band re-weighting of the task vector)"
    paper_url = "https://arxiv.org/abs/2505.18713"
    rescales = True

    def bands(self, abs_d: torch.Tensor, params: MethodParams) -> torch.Tensor:
        """uint8 band of each entry of |D| (rows, cols): tensor scope, one row."""
        cuts = band_cuts(abs_d.shape[-1], params_edges(params))
        return band_ids(order_keys(abs_d), cuts)

    def select(
        self, w: torch.Tensor, d: torch.Tensor, params: MethodParams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        abs_d = d.abs()
        band = self.bands(abs_d, params)
        tables = tables_of(params, len(params_edges(params)) - 1)
        keep = top_k_mask(
            tables.reweighted_keys(band, abs_d), keep_count(d.shape[-1], params.density)
        )
        return keep, tables.entry_factors(band)

    def mask(self, w: torch.Tensor, d: torch.Tensor, params: MethodParams) -> torch.Tensor:
        return self.select(w, d, params)[0]


# ---------------------------------------------------------------------------------------------
# scope "model"
# ---------------------------------------------------------------------------------------------


class BandCursor:
    """Bands of the tensors in plan order from global thresholds at the inner cuts (each pass
    over the model needs its own cursor: a threshold hands out its ties in order)."""

    def __init__(self, inner: Sequence[GlobalThreshold]) -> None:
        self.inner = [replace(t) for t in inner]

    def bands(self, abs_keys: torch.Tensor) -> torch.Tensor:
        band = torch.zeros(abs_keys.shape, dtype=torch.uint8, device=abs_keys.device)
        for threshold in self.inner:
            band += ~threshold.mask(abs_keys)
        return band


@dataclass
class NpsModelSelection:
    """Scope model, after the counting passes: feed each pruned tensor's |D| keys in plan order
    to `select` (the write pass), once."""

    inner: list[GlobalThreshold]  # the |D| thresholds at the inner band cuts (not consumed)
    keep: GlobalThreshold  # the top k of |T| over the model
    tables: BandTables
    cuts: list[int]  # the global rank cuts (band counts are their differences)

    def __post_init__(self) -> None:
        self._cursor = BandCursor(self.inner)
        self._keep = replace(self.keep)

    def select(self, abs_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep-mask, per-entry c_b) of the next tensor in plan order."""
        band = self._cursor.bands(abs_keys)
        keep = self._keep.mask(self.tables.reweighted_keys(band, abs_from_keys(abs_keys)))
        return keep, self.tables.entry_factors(band)

    def band_counts(self) -> list[int]:
        return [b - a for a, b in zip(self.cuts, self.cuts[1:], strict=False)]


def model_band_thresholds(
    key_passes: Callable[[], Iterable[torch.Tensor]], edges: Sequence[float]
) -> tuple[list[GlobalThreshold], list[int]]:
    """The |D| thresholds at the inner band cuts over the model, and the global cuts (two
    passes over the |D| keys)."""
    found: list[int] = []

    def counts(total: int) -> list[int]:
        found[:] = band_cuts(total, edges)
        return found[1:-1]

    inner = find_global_thresholds(key_passes, counts)
    return inner, list(found)


def reweighted_passes(
    key_passes: Callable[[], Iterable[torch.Tensor]],
    inner: Sequence[GlobalThreshold],
    tables: BandTables,
) -> Callable[[], Iterator[torch.Tensor]]:
    """Passes over the |T| keys of every tensor in plan order, from the |D| keys' passes."""

    def passes() -> Iterator[torch.Tensor]:
        cursor = BandCursor(inner)
        for abs_keys in key_passes():
            yield tables.reweighted_keys(cursor.bands(abs_keys), abs_from_keys(abs_keys))

    return passes


def count_model_scope(
    key_passes: Callable[[], Iterable[torch.Tensor]], params: MethodParams
) -> NpsModelSelection:
    """Four streaming passes over the |D| order keys of every pruned tensor (plan order): two fix
    the band cuts, two the top k of |T|."""
    edges = params_edges(params)
    inner, cuts = model_band_thresholds(key_passes, edges)
    tables = tables_of(params, len(edges) - 1)
    passes = reweighted_passes(key_passes, inner, tables)
    [keep] = find_global_thresholds(passes, lambda total: [keep_count(total, params.density)])
    return NpsModelSelection(inner, keep, tables, cuts)
