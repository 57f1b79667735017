"""delta_stats: the numba pass (CPU) against the torch version (GPU, no numba) and a float64 plain
loop; a window's sums do not depend on where it lies in memory (chunked = whole tensor)."""

from __future__ import annotations

import math

import pytest
import torch

from worker.engine import compose
from worker.engine.compose import TensorStats, delta_stats
from worker.engine.kernels import cpu_stats


def _case(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=generator).to(torch.bfloat16).float()
    w[::13] = 0.0
    f = (w + 0.02 * torch.randn(n, generator=generator)).to(torch.bfloat16).float()
    f[::7] = w[::7]  # D == 0
    w[5], f[9], f[11], w[11] = float("inf"), float("nan"), float("-inf"), float("-inf")
    f[20] = 3e38
    w[20] = -3e38  # finite W and F, D overflows to inf
    keep = torch.rand(n, generator=generator) < 0.3
    return w, f, f - w, keep


def _reference(w, f, d, keep) -> TensorStats:
    """Plain Python loops in float64 (math.fsum: the exactly rounded sums)."""
    stats = TensorStats(n=d.numel())
    l1, l1k, l2, l2k = [], [], [], []
    for wi, fi, di, ki in zip(w.tolist(), f.tolist(), d.tolist(), keep.tolist(), strict=True):
        a = abs(di) if math.isfinite(di) else 0.0
        stats.kept += ki
        stats.nonzero_delta += di != 0
        stats.kept_nonzero += ki and di != 0
        stats.w_zero += wi == 0
        stats.nonfinite += (not math.isfinite(wi)) + (not math.isfinite(fi))
        l1.append(a), l2.append(a * a)
        if ki:
            l1k.append(a), l2k.append(a * a)
    stats.l1_total, stats.l1_kept = math.fsum(l1), math.fsum(l1k)
    stats.l2sq_total, stats.l2sq_kept = math.fsum(l2), math.fsum(l2k)
    return stats


def _torch_version(monkeypatch, *tensors) -> TensorStats:
    with monkeypatch.context() as patch:
        patch.setattr(cpu_stats, "HAVE_NUMBA", False)
        return delta_stats(*tensors)


def _assert_close(got: TensorStats, want: TensorStats) -> None:
    for key in ("n", "kept", "nonzero_delta", "kept_nonzero", "w_zero", "nonfinite"):
        assert getattr(got, key) == getattr(want, key), key
    for key in ("l1_total", "l1_kept", "l2sq_total", "l2sq_kept"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-12), key


@pytest.mark.parametrize("n", [1, 31, 1000, 4099])
def test_numba_stats_are_the_reference_and_the_torch_version(monkeypatch, n):
    assert cpu_stats.HAVE_NUMBA  # a test dependency: this is the numba pass
    monkeypatch.setattr(compose, "_STATS_CHUNK", 1024)  # several windows, a partial last one
    case = _case(max(n, 32), n)
    case = tuple(t[:n] for t in case)
    got = delta_stats(*case)
    _assert_close(got, _reference(*case))
    _assert_close(got, _torch_version(monkeypatch, *case))


def test_a_window_s_sums_do_not_depend_on_its_address():
    w, f, d, keep = _case(5000, 3)
    whole = delta_stats(w[:4096], f[:4096], d[:4096], keep[:4096])
    for offset in (1, 3, 8):
        moved = [torch.empty(4096 + offset, dtype=t.dtype) for t in (w, f, d, keep)]
        views = []
        for buffer, t in zip(moved, (w, f, d, keep), strict=True):
            buffer[offset:] = t[:4096]
            views.append(buffer[offset:])
        assert delta_stats(*views) == whole
