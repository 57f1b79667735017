"""The fused CPU kernel against the torch path: output bytes bit for bit, statistics exactly."""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch

from worker.engine.compose import TensorStats, compose_output, delta_stats
from worker.engine.kernels import cpu_fused
from worker.engine.kernels.cpu_fused import fused_available, fused_prune
from worker.engine.methods.base import MethodParams
from worker.engine.methods.fapm import Fapm
from worker.engine.methods.magnitude import Magnitude
from worker.engine.select import keep_count, order_keys, top_k_mask

pytestmark = pytest.mark.skipif(not fused_available(), reason="numba is not installed")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
METHODS = ("fapm", "magnitude")
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
INT_FIELDS = ("n", "kept", "nonzero_delta", "kept_nonzero", "w_zero", "nonfinite")
FLOAT_FIELDS = ("l1_total", "l1_kept", "l2sq_total", "l2sq_kept")


def torch_path(method: str, w: torch.Tensor, f: torch.Tensor, k: int, alpha: float):
    """The reference: scores -> order keys -> exact top-k -> select, and delta_stats."""
    w32 = w.float().reshape(1, -1)
    f32 = f.float().reshape(1, -1)
    d32 = f32 - w32
    scorer = Fapm() if method == "fapm" else Magnitude()
    scores = scorer.scores(w32, d32, MethodParams(sparsity=0.5, alpha=alpha))
    keep = top_k_mask(order_keys(scores).view(1, -1), k)
    out = compose_output(w.reshape(1, -1), f.reshape(1, -1), keep, 1.0, f.dtype).reshape(w.shape)
    return out, delta_stats(w32, f32, d32, keep)


def assert_same(method, w, f, k, alpha=1.0):
    out = torch.empty_like(f)
    stats = fused_prune(method, w, f, k, alpha, out)
    ref_out, ref_stats = torch_path(method, w, f, k, alpha)
    bits = BITS[f.dtype]
    got, want = out.view(bits), ref_out.view(bits)
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        pytest.fail(
            f"{method} {f.dtype} n={w.numel()} k={k}: {len(bad)} entries differ, first {bad[:5].tolist()}"
        )
    assert_stats(stats, ref_stats)
    return stats


def assert_stats(got: TensorStats, want: TensorStats):
    for name in INT_FIELDS:
        assert getattr(got, name) == getattr(want, name), name
    for name in FLOAT_FIELDS:
        assert math.isclose(
            getattr(got, name), getattr(want, name), rel_tol=1e-9, abs_tol=1e-300
        ), (
            name,
            getattr(got, name),
            getattr(want, name),
        )


def ks_for(n: int) -> list[int]:
    return sorted({0, 1, n // 2, max(n - 1, 0), n, keep_count(n, 0.1)})


def pair(n, dtype, seed=0, noise=2e-3, shape=None):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, generator=g) * 0.02).to(dtype)
    f = (w.float() + torch.randn(n, generator=g) * noise).to(dtype)
    if shape is not None:
        w, f = w.reshape(shape), f.reshape(shape)
    return w.contiguous(), f.contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 7, 1000, 65537, 300001])
def test_random_sizes_and_ks(method, dtype, n):
    w, f = pair(n, dtype, seed=n)
    for k in ks_for(n):
        assert_same(method, w, f, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_two_d_and_alpha(method, dtype):
    w, f = pair(64 * 1031, dtype, seed=3, shape=(64, 1031))
    for alpha in (0.5, 1.0, 3.0):
        for k in ks_for(w.numel()):
            assert_same(method, w, f, k, alpha)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [5000, 300001])
def test_ties_and_zeros(method, dtype, n):
    """Values from a tiny set: scores tie at the threshold, zeros in W and in D, -0.0."""
    g = torch.Generator().manual_seed(11)
    levels_w = torch.tensor([-0.02, -0.0, 0.0, 0.01, 0.02, 0.04])
    levels_d = torch.tensor([0.0, 0.0, 0.0, 0.005, -0.005, 0.01])
    w = levels_w[torch.randint(0, 6, (n,), generator=g)]
    f = w + levels_d[torch.randint(0, 6, (n,), generator=g)]
    w, f = w.to(dtype), f.to(dtype)
    # -0.0 in F where W is +0.0 (D == 0), and the other way round
    f[(w == 0) & (f == 0)] = -0.0
    for k in sorted({*ks_for(n), n // 3, n // 4, n // 7, n - n // 3, 2 * n // 3}):
        assert_same(method, w, f, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1000, 300001])
def test_nan_inf(method, dtype, n):
    w, f = pair(n, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    for t in (w, f):
        idx = torch.randint(0, n, (max(3, n // 200),), generator=g)
        t[idx] = specials[torch.randint(0, 3, idx.shape, generator=g)]
    for k in ks_for(n):
        assert_same(method, w, f, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mostly_nan_scores(dtype):
    """More NaN scores than n - k: the k-th key is NaN (the fallback path), and magnitude's
    NaN-free W, F with inf in F only."""
    n = 300001
    w, f = pair(n, dtype, seed=8)
    f[: 2 * n // 3] = float("nan")
    for k in (n // 2, n - 5, n // 3 + 7):
        for method in METHODS:
            assert_same(method, w, f, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp_subnormals(dtype):
    """Subnormal W and F (the fp16 decoder's subnormal path; a huge FAPM ratio)."""
    n = 20000
    g = torch.Generator().manual_seed(9)
    tiny = torch.finfo(dtype).smallest_normal
    w = (torch.randn(n, generator=g) * tiny).to(dtype)
    f = (w.float() + torch.randn(n, generator=g) * tiny * 0.25).to(dtype)
    for method in METHODS:
        for k in ks_for(n):
            assert_same(method, w, f, k)


@pytest.mark.parametrize("method", METHODS)
def test_bracket_misses_and_endpoint_ties(method, monkeypatch):
    """Brackets above, below, around the k-th key, or a single key, with the ties at hi kept
    provisionally or not: always the same result (fallback and endpoint-fix paths)."""
    w, f = pair(270001, torch.bfloat16, seed=12)  # > 2 * _SAMPLE: the sampled path
    n = w.numel()
    real = cpu_fused._bracket
    cases = [(0.999, 0.9995), (0.01, 0.02), (0.5, 0.5), (0.0, 1.0), (0.85, 0.95), (0.9, 0.9)]
    for (lo_rank, hi_rank), ge in itertools.product(cases, (True, False)):

        def fake(keys, n_, k_, stride, lo_rank=lo_rank, hi_rank=hi_rank, ge=ge):
            m = len(keys)
            lo_key = int(keys[min(m - 1, int(lo_rank * m))])
            hi_key = int(keys[min(m - 1, int(hi_rank * m))])
            lo_key = min(max(lo_key, cpu_fused._KEY_NEG_INF), cpu_fused._KEY_POS_INF)
            hi_key = min(max(hi_key, cpu_fused._KEY_NEG_INF), cpu_fused._KEY_POS_INF)
            return lo_key, hi_key, ge or lo_key < hi_key, real(keys, n_, k_, stride)[3]

        monkeypatch.setattr(cpu_fused, "_bracket", fake)
        for k in (keep_count(n, 0.1), 17):
            assert_same(method, w, f, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_candidate_overflow(method, dtype, monkeypatch):
    """Candidate buffers too small for their chunks: those chunks are recomputed."""
    monkeypatch.setattr(cpu_fused, "_candidate_cap", lambda per_chunk, n, nchunks: 3)
    w, f = pair(300001, dtype, seed=13, noise=5e-4)
    for k in ks_for(w.numel()):
        assert_same(method, w, f, k)


def test_thread_count_does_not_matter():
    import numba

    w, f = pair(1_000_003, torch.bfloat16, seed=14)
    k = keep_count(w.numel(), 0.1)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            out = torch.empty_like(f)
            results.append((out, fused_prune("fapm", w, f, k, 1.0, out)))
    finally:
        numba.set_num_threads(before)
    assert torch.equal(results[0][0].view(torch.int16), results[-1][0].view(torch.int16))
    assert results[0][1] == results[-1][1]  # float sums too: fixed chunks, fixed order


def test_errors():
    w, f = pair(10, torch.float32)
    with pytest.raises(ValueError, match="unsupported method"):
        fused_prune("random", w, f, 3, 1.0, torch.empty_like(f))
    with pytest.raises(ValueError):
        fused_prune("fapm", w, f.bfloat16(), 3, 1.0, torch.empty_like(f))
    with pytest.raises(ValueError):
        fused_prune("fapm", w, f, 3, 1.0, torch.empty(11))
    with pytest.raises(ValueError):
        fused_prune("fapm", w.double(), f.double(), 3, 1.0, torch.empty_like(f.double()))
    wt = torch.randn(8, 6).t()
    with pytest.raises(ValueError, match="contiguous"):
        fused_prune("fapm", wt, wt + 1, 3, 1.0, torch.empty_like(wt))
    empty = torch.empty(0, 4, dtype=torch.bfloat16)
    assert fused_prune("fapm", empty, empty, 0, 1.0, torch.empty_like(empty)) == TensorStats()


@pytest.mark.slow
def test_large_bf16_equals_torch_path_and_timing():
    """A 14336 x 1536 (22M) bf16 pair, 90% sparsity: equality, and timings printed (-s)."""
    g = torch.Generator().manual_seed(0)
    shape = (14336, 1536)
    w = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    f = (w.float() + torch.randn(shape, generator=g) * 2e-4).bfloat16()
    n = w.numel()
    k = keep_count(n, 0.1)
    out = torch.empty_like(f)
    for method in METHODS:
        fused_prune(method, w, f, k, 1.0, out)  # warm
        t0 = time.perf_counter()
        stats = fused_prune(method, w, f, k, 1.0, out)
        t_fused = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref_out, ref_stats = torch_path(method, w, f, k, 1.0)
        t_torch = time.perf_counter() - t0
        t0 = time.perf_counter()
        out.copy_(f)
        t_copy = time.perf_counter() - t0
        stats_again = fused_prune(method, w, f, k, 1.0, out)
        assert torch.equal(out.view(torch.int16), ref_out.view(torch.int16))
        assert_stats(stats, ref_stats)
        assert stats == stats_again
        print(
            f"\n{method} n={n}: fused {t_fused * 1e3:.1f} ms, torch path {t_torch * 1e3:.1f} ms, "
            f"copy {t_copy * 1e3:.1f} ms (fused = {t_fused / t_copy:.1f}x copy, "
            f"{t_torch / t_fused:.1f}x faster than torch)"
        )


def test_warmup_runs():
    cpu_fused.warmup()  # compiles or loads every specialisation; must not raise
