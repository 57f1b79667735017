"""Exact, deterministic top-k selection (the torch path, any device).

The order is total and the same on every device and in every implementation:
  - a higher score ranks first; -0.0 equals +0.0; NaN ranks below -inf;
  - equal scores rank by the lower flat index (row-local index in row scope).
`k` entries are kept, never "everything above a float threshold", so ties cannot add or remove
entries. The fused CPU kernel (`kernels/cpu_fused.py`) implements the same order and is tested
against this.

No int64 index per entry is allocated: scores become an order-preserving int32 key, the k-th key
is found with `kthvalue`, and only the ties at that key are resolved by a cumulative count.
"""

from __future__ import annotations

import torch

_INT32_MIN = -(2**31)


def keep_count(n: int, density: float) -> int:
    """k = floor(density * n + 0.5): the exact number of entries kept out of n (ALGORITHMS.md)."""
    return min(n, max(0, int(density * n + 0.5)))


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Map float32 scores to int32 keys with the same order (NaN lowest, -0.0 == +0.0)."""
    scores = scores.to(torch.float32)
    canonical = torch.where(scores == 0, torch.zeros_like(scores), scores)
    bits = canonical.view(torch.int32)
    # Negative floats order in reverse of their bit patterns: flip their 31 low bits.
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return keys.masked_fill_(torch.isnan(scores), _INT32_MIN)


def top_k_mask(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k highest keys along the last dim, ties to the lower index.

    `keys` is int32 of shape (rows, cols) (one row for tensor scope); `k` is per row.
    """
    cols = keys.shape[-1]
    if k <= 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(keys, dtype=torch.bool)
    # The k-th largest is the (cols - k + 1)-th smallest.
    threshold = torch.kthvalue(keys, cols - k + 1, dim=-1, keepdim=True).values
    above = keys > threshold
    ties = keys == threshold
    ties_to_keep = k - above.sum(dim=-1, keepdim=True, dtype=torch.int32)
    tie_rank = torch.cumsum(ties, dim=-1, dtype=torch.int32)
    return above | (ties & (tie_rank <= ties_to_keep))


def rank_window_mask(keys: torch.Tensor, skip: int, k: int) -> torch.Tensor:
    """Bool mask of the entries ranked skip .. skip+k-1 (0-based) in the order above."""
    mask = top_k_mask(keys, skip + k)
    if skip > 0:
        mask &= ~top_k_mask(keys, skip)
    return mask
