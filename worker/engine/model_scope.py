"""Scope `model`: one exact top-k over every pruned tensor, found by streaming, never by
concatenating the model.

k = floor((1 - s) * N + 0.5) over the N entries of all pruned tensors. The global order is the
tensor-scope order extended across tensors: higher score first, ties to the earlier tensor (in the
plan's order) and then to the lower flat index. Two streaming passes find the k-th key exactly
(a histogram of the keys' high 16 bits, then of the low 16 bits inside the bucket that holds the
k-th); the write pass keeps keys above it and hands out the remaining ties in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from worker.engine.select import keep_count

_BUCKETS = 1 << 16


def unsigned_keys(keys: torch.Tensor) -> torch.Tensor:
    """int32 order keys -> int64 in [0, 2**32) with the same order."""
    return keys.to(torch.int64) + 2**31


def _high_bits(keys: torch.Tensor) -> torch.Tensor:
    """unsigned_keys(keys) >> 16, computed in int32 (an arithmetic shift, then + 2**15)."""
    return (keys >> 16) + (1 << 15)


def _kth_bucket(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest entry (1-based k) and the count in buckets above it."""
    above = torch.flip(torch.cumsum(torch.flip(histogram, [0]), 0), [0])  # entries in >= bucket
    bucket = int(torch.nonzero(above >= k).max())
    count_above = int(above[bucket + 1]) if bucket + 1 < len(histogram) else 0
    return bucket, count_above


@dataclass
class GlobalThreshold:
    """Keep keys > `key`; of the ties at `key`, the first `ties_left` in global order."""

    key: int  # unsigned key (see unsigned_keys); -1 keeps everything, 2**32 nothing
    ties_left: int

    def mask(self, keys: torch.Tensor) -> torch.Tensor:
        """The keep-mask of the next tensor in plan order; consumes its share of the ties."""
        assert keys.dtype == torch.int32, "order keys (select.order_keys)"
        flat = keys.reshape(-1)
        if self.key < 0 or self.key >= 2**32:  # everything, or nothing (and no ties either way)
            return torch.full(keys.shape, self.key < 0, dtype=torch.bool, device=keys.device)
        # Compared as the int32 keys themselves (unsigned_keys adds 2**31, an order-preserving
        # shift): no int64 copy of the keys, which made this most of a chunked nps prune.
        key = self.key - 2**31
        keep = flat > key
        ties = flat == key
        if self.ties_left > 0:  # the first ties_left tied entries, in flat order
            taken = torch.nonzero(ties).reshape(-1)[: self.ties_left]
            keep[taken] = True
            self.ties_left -= taken.numel()
        return keep.reshape(keys.shape)


def find_global_threshold(
    key_passes: Callable[[], Iterable[torch.Tensor]], density: float
) -> GlobalThreshold:
    """Two streaming passes over the order keys of every pruned tensor.

    `key_passes()` yields each tensor's int32 order keys, in plan order, every time it is called.
    """
    return find_global_thresholds(key_passes, lambda total: [keep_count(total, density)])[0]


def find_global_thresholds(
    key_passes: Callable[[], Iterable[torch.Tensor]],
    counts: Callable[[int], Sequence[int]],
) -> list[GlobalThreshold]:
    """The global top-k thresholds for several k at once, in the same two streaming passes.

    `counts(total)` gives the k's from the number of entries found by the first pass (nps cuts
    the |D| order into bands at several ranks). The second pass is skipped when every k is 0 or
    the total.
    """
    total = 0
    high = torch.zeros(_BUCKETS, dtype=torch.int64)
    for keys in key_passes():
        high += torch.bincount(_high_bits(keys.reshape(-1)), minlength=_BUCKETS)
        total += keys.numel()
    ks = [min(total, max(0, k)) for k in counts(total)]
    # For each k inside (0, total): its high bucket and the entries in buckets above it.
    located = {k: _kth_bucket(high, k) for k in ks if 0 < k < total}
    low = {bucket: torch.zeros(_BUCKETS, dtype=torch.int64) for bucket, _ in located.values()}
    if low:
        buckets = torch.tensor(sorted(low), dtype=torch.int32)
        for keys in key_passes():
            flat = keys.reshape(-1)
            high_part = _high_bits(flat)
            # One pass picks the entries of every located bucket (few); each histogram from them.
            chosen = torch.isin(high_part, buckets.to(flat.device))
            flat, high_part = flat[chosen], high_part[chosen]
            for bucket, histogram in low.items():
                inside = unsigned_keys(flat[high_part == bucket])
                histogram += torch.bincount(inside & 0xFFFF, minlength=_BUCKETS)
    thresholds = []
    for k in ks:
        if k == 0:
            thresholds.append(GlobalThreshold(key=2**32, ties_left=0))
        elif k == total:
            thresholds.append(GlobalThreshold(key=-1, ties_left=0))
        else:
            bucket, above_bucket = located[k]
            low_bucket, above_in_bucket = _kth_bucket(low[bucket], k - above_bucket)
            key = (bucket << 16) | low_bucket
            thresholds.append(GlobalThreshold(key, k - above_bucket - above_in_bucket))
    return thresholds
