"""From a keep-mask to output bytes and report statistics (the torch path).

Select, do not add: O = F where kept, W elsewhere, exact in every dtype. Only a rescaling method or
a scale != 1 computes O = cast(float32(W) + factor * float32(D)), rounded once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from worker.engine.kernels import cpu_stats


@dataclass
class TensorStats:
    """Per-tensor counts for the report. Norms are of D's selected entries vs. all of D."""

    n: int = 0
    kept: int = 0
    nonzero_delta: int = 0
    kept_nonzero: int = 0
    l1_total: float = 0.0
    l1_kept: float = 0.0
    l2sq_total: float = 0.0
    l2sq_kept: float = 0.0
    w_zero: int = 0
    nonfinite: int = 0

    def add(self, other: TensorStats) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def summary(self) -> dict[str, float | int]:
        def ratio(a: float, b: float) -> float:
            return a / b if b else 1.0

        return {
            "n": self.n,
            "kept": self.kept,
            "density": ratio(self.kept, self.n),
            "nonzero_delta": self.nonzero_delta,
            "kept_nonzero": self.kept_nonzero,
            "density_of_nonzero": ratio(self.kept_nonzero, self.nonzero_delta),
            "l1_kept_ratio": ratio(self.l1_kept, self.l1_total),
            "l2_kept_ratio": ratio(self.l2sq_kept, self.l2sq_total) ** 0.5,
            "w_zero": self.w_zero,
            "nonfinite": self.nonfinite,
        }


_STATS_CHUNK = 1 << 22  # float64 work in chunks: no whole-tensor float64 copies


def delta_stats(
    w32: torch.Tensor, f32: torch.Tensor, d32: torch.Tensor, keep: torch.Tensor
) -> TensorStats:
    """Statistics of one pruned tensor (float32 inputs; sums accumulated in float64), window by
    window of _STATS_CHUNK entries: in one numba pass per window on CPU (kernels/cpu_stats.py),
    in torch on a GPU or without numba."""
    stats = TensorStats(n=d32.numel())
    flat_d, flat_keep = d32.reshape(-1), keep.reshape(-1)
    flat_w, flat_f = w32.reshape(-1), f32.reshape(-1)
    if cpu_stats.HAVE_NUMBA and flat_d.device.type == "cpu":
        for start in range(0, stats.n, _STATS_CHUNK):
            part = slice(start, start + _STATS_CHUNK)
            window = (flat_w[part], flat_f[part], flat_d[part], flat_keep[part])
            counts, sums = cpu_stats.window_stats(*(t.contiguous().numpy() for t in window))
            stats.add(_window(counts, sums))
        return stats
    for start in range(0, stats.n, _STATS_CHUNK):
        part = slice(start, start + _STATS_CHUNK)
        d, kept = flat_d[part], flat_keep[part]
        a = d.abs().to(torch.float64)
        a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
        kept_a = torch.where(kept, a, torch.zeros_like(a))
        nonzero = d != 0
        stats.kept += int(kept.sum())
        stats.nonzero_delta += int(nonzero.sum())
        stats.kept_nonzero += int((kept & nonzero).sum())
        stats.l1_total += float(a.sum())
        stats.l1_kept += float(kept_a.sum())
        stats.l2sq_total += float((a * a).sum())
        stats.l2sq_kept += float((kept_a * kept_a).sum())
        stats.w_zero += int((flat_w[part] == 0).sum())
        stats.nonfinite += int((~torch.isfinite(flat_w[part])).sum())
        stats.nonfinite += int((~torch.isfinite(flat_f[part])).sum())
    return stats


def _window(counts: tuple[int, ...], sums: tuple[float, ...]) -> TensorStats:
    kept, nonzero, kept_nonzero, w_zero, nonfinite = (int(c) for c in counts)
    l1, l1k, l2, l2k = (float(x) for x in sums)
    return TensorStats(
        kept=kept, nonzero_delta=nonzero, kept_nonzero=kept_nonzero, l1_total=l1, l1_kept=l1k,
        l2sq_total=l2, l2sq_kept=l2k, w_zero=w_zero, nonfinite=nonfinite,
    )  # fmt: skip


def compose_output(
    w: torch.Tensor,
    f: torch.Tensor,
    keep: torch.Tensor,
    factor: float | torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The output tensor in `out_dtype`.

    `w` and `f` are in their stored dtypes (W is cast to F's when they differ); `keep` has their
    shape. `factor` is the multiplier on kept updates: 1.0 selects F exactly. A float32 tensor of
    their shape gives each entry its own multiplier (nps's c_b): F exactly where it is 1, the
    rescale elsewhere.
    """
    if w.dtype != f.dtype:
        w = w.to(f.dtype)
    per_entry = isinstance(factor, torch.Tensor)
    if not per_entry and factor == 1.0:
        return torch.where(keep, f, w).to(out_dtype)
    w32 = w.to(torch.float32)
    d32 = f.to(torch.float32) - w32
    if per_entry:
        factor32 = factor.to(device=w.device, dtype=torch.float32)
    else:
        factor32 = torch.tensor(factor, dtype=torch.float32, device=w.device)
    # Where kept, round once from float32; where dropped, W exactly.
    rescaled = (w32 + factor32 * d32).to(out_dtype)
    out = torch.where(keep, rescaled, w.to(out_dtype))
    if per_entry:
        out = torch.where(keep & (factor32 == 1.0), f.to(out_dtype), out)
    return out


class StatsStream:
    """`delta_stats` of one tensor fed in consecutive flat pieces (`feed`, in order): the same
    numbers as one call on the whole tensor. Its float64 sums are taken over the same windows of
    _STATS_CHUNK entries and added in the same order, so a window that straddles pieces is held
    (copied, at most one window) until it is complete."""

    def __init__(self) -> None:
        self.stats = TensorStats()
        self._held: list[tuple[torch.Tensor, ...]] = []
        self._held_n = 0

    def feed(
        self, w32: torch.Tensor, f32: torch.Tensor, d32: torch.Tensor, keep: torch.Tensor
    ) -> None:
        parts = [t.reshape(-1) for t in (w32, f32, d32, keep)]
        n, start = parts[0].numel(), 0
        while start < n:
            take = min(n - start, _STATS_CHUNK - self._held_n)
            piece = tuple(p[start : start + take] for p in parts)
            start += take
            if take == _STATS_CHUNK:  # a whole window inside this piece
                self.stats.add(delta_stats(*piece))
                continue
            self._held.append(tuple(p.clone() for p in piece))
            self._held_n += take
            if self._held_n == _STATS_CHUNK:
                self._flush()

    def _flush(self) -> None:
        if self._held:
            window = [torch.cat(column) for column in zip(*self._held, strict=True)]
            self.stats.add(delta_stats(*window))
        self._held, self._held_n = [], 0

    def result(self) -> TensorStats:
        """The statistics of everything fed (the last window may be short, as in delta_stats)."""
        self._flush()
        return self.stats
