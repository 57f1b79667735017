"""Activation statistics per input channel, the calibration modes' column weights (task-aware
fusion included), and the keep masks of Wanda and magnitude (ALGORITHMS.md "Task-aware weight
pruning"). Selection is the engine's exact top-k (worker/engine/select.py): k entries, ties to
the lower index, the same on every device."""

from __future__ import annotations

import math

import torch

from worker.engine.select import keep_count, order_keys, top_k_mask
from worker.errors import FapmError

GENERAL, TASK = "general", "task"
LOG_EPSILON = 1e-12


class PatternMismatch(FapmError, ValueError):
    """An N:M pattern on a layer whose input width is not a multiple of M."""

    code = "pattern_mismatch"


class ChannelStats:
    """Sum over sequences of ||X_seq[:, j]||^2 per input channel j, per calibration source, in
    float64; `mean(source)` is Wanda's `scaler_row`: that sum over the source's sequences / N."""

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, source: str, x: torch.Tensor) -> None:
        """One sequence's inputs (tokens, columns)."""
        x = x.reshape(-1, self.columns).to(torch.float64)
        squared = (x * x).sum(dim=0)
        if source in self.sums:
            self.sums[source] += squared
        else:
            self.sums[source] = squared
        self.counts[source] = self.counts.get(source, 0) + 1

    def mean(self, *sources: str) -> torch.Tensor:
        """a = (sum over the sources' sequences) / (their count): `mixed` for two sources."""
        total = sum(self.sums[s] for s in sources)
        return total / sum(self.counts[s] for s in sources)


def column_weights(
    stats: ChannelStats, mode: str, exclusive_frac: float = 0.1, beta: float = 0.5
) -> tuple[torch.Tensor, dict[str, int]]:
    """Each input channel's weight in the score |W_ij| * f_j (float64), and how many channels
    were task-exclusive, general-exclusive and shared (taskaware; all shared otherwise)."""
    if mode == GENERAL:
        return stats.mean(GENERAL).sqrt(), {"shared": stats.columns}
    if mode == TASK:
        return stats.mean(TASK).sqrt(), {"shared": stats.columns}
    if mode == "mixed":
        return stats.mean(GENERAL, TASK).sqrt(), {"shared": stats.columns}
    g = _normalised(stats.mean(GENERAL).sqrt())
    t = _normalised(stats.mean(TASK).sqrt())
    delta = torch.log(t + LOG_EPSILON) - torch.log(g + LOG_EPSILON)
    tau = float(torch.quantile(delta.abs(), 1.0 - exclusive_frac))
    task_only = delta > tau
    general_only = delta < -tau
    fused = beta * g + (1.0 - beta) * t
    fused = torch.where(task_only, t, torch.where(general_only, g, fused))
    counts = {
        "task_exclusive": int(task_only.sum()),
        "general_exclusive": int(general_only.sum()),
        "shared": int((~task_only & ~general_only).sum()),
    }
    return fused, counts


def _normalised(values: torch.Tensor) -> torch.Tensor:
    mean = float(values.mean())
    return values / mean if mean > 0 and math.isfinite(mean) else values


def keep_mask(
    scores: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    per_row: bool = True,
    where: str = "",
) -> torch.Tensor:
    """Bool keep mask of (rows, columns) scores: the top k = floor((1 - s) * n + 0.5) of each
    row (per_row) or of the whole matrix, or N of every M consecutive entries of a row."""
    rows, columns = scores.shape
    keys = order_keys(scores.to(torch.float32))
    if pattern is not None:
        n, m = pattern
        if columns % m:
            raise PatternMismatch(
                f"{where}: {columns} inputs are not a multiple of {m}: the {n}:{m} pattern "
                "cannot group them"
            )
        return top_k_mask(keys.reshape(-1, m), n).reshape(rows, columns)
    if per_row:
        return top_k_mask(keys, keep_count(columns, 1.0 - sparsity))
    return top_k_mask(keys.reshape(1, -1), keep_count(rows * columns, 1.0 - sparsity)).reshape(
        rows, columns
    )


def wanda_scores(weight: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """|W_ij| * f_j in float32 (ALGORITHMS.md: S = |W| * sqrt(a)[None, :] for plain Wanda)."""
    return weight.abs().to(torch.float32) * columns.to(torch.float32)[None, :]
