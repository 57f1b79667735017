"""worker/engine/chunked.py on small tensors in tiny chunks, against plain-loop references: the
selection spans chunks exactly (ties to the lower flat index), draws at an offset are the
whole tensor's, the streamed statistics are delta_stats', and the counting passes' key chunks are
the whole tensor's keys. (tests/integration/test_chunked_tensors.py runs it through the pipeline
against the whole-tensor path, byte for byte.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worker.engine import chunked, compose
from worker.engine.compose import StatsStream, delta_stats
from worker.engine.methods.base import MethodParams, uniform_draws
from worker.engine.plan import TensorTask
from worker.engine.tensor_pruner import TensorPruner
from worker.spec import JobSpec

ROWS, COLS = 37, 53  # 1961 entries: chunks of 16 * 4 = 64 entries, the last one partial
CHUNK_BYTES = 64 * 16  # chunked._BYTES_PER_CHUNK_ENTRY per entry


def _pair(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS, COLS, generator=generator) * 0.02
    # Deltas on a coarse grid: many ties in |D|, and some exact zeros.
    d = torch.round(torch.randn(ROWS, COLS, generator=generator) * 2) / 256
    return w.bfloat16(), (w + d).bfloat16()


def _pruner(method: str, scope: str, **extra) -> TensorPruner:
    spec = JobSpec(base="/b", finetuned="/f", output="/o", method=method, sparsity=0.7,
                   scope=scope, kernel="torch", **extra)  # fmt: skip
    return TensorPruner(spec)


def _ranked(values: list[float], skip: int, k: int) -> set[int]:
    """Indices ranked skip .. skip + k - 1 by value, descending, ties to the lower index."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return set(order[skip : skip + k])


def _count(n: int, fraction: float) -> int:
    return min(n, max(0, int(fraction * n + 0.5)))


def _expected(w: torch.Tensor, f: torch.Tensor, kept: set[int]) -> torch.Tensor:
    flat_w, flat_f = w.reshape(-1).tolist(), f.reshape(-1).tolist()
    values = [flat_f[i] if i in kept else flat_w[i] for i in range(len(flat_w))]
    return torch.tensor(values, dtype=torch.float64).to(f.dtype).reshape(f.shape)


def test_breadcrumbs_tensor_scope_window_spans_chunks():
    w, f = _pair()
    pruner = _pruner("breadcrumbs", "tensor", gamma=0.05)
    out, stats = chunked.prune(pruner, "t", w, f, f.dtype, None, CHUNK_BYTES)
    pairs = zip(w.reshape(-1).tolist(), f.reshape(-1).tolist(), strict=True)
    flat_d = [float(np.float32(b) - np.float32(a)) for a, b in pairs]  # D in float32
    a = [abs(x) for x in flat_d]
    n = len(a)
    k = _count(n, 0.3)
    kept = _ranked(a, min(_count(n, 0.05), n - k), k)
    assert torch.equal(out.view(torch.int16), _expected(w, f, kept).view(torch.int16))
    assert stats.kept == k and stats.n == n
    assert stats.kept_nonzero == sum(1 for i in kept if flat_d[i] != 0)
    assert math.isclose(stats.l1_kept, math.fsum(a[i] for i in kept), rel_tol=1e-12)
    assert math.isclose(stats.l1_total, math.fsum(a), rel_tol=1e-12)


def test_fapm_row_scope_uses_the_whole_tensor_coefficient():
    w, f = _pair(2)
    pruner = _pruner("fapm", "row", alpha=2.0)
    out, stats = chunked.prune(pruner, "t", w, f, f.dtype, None, CHUNK_BYTES)
    w64 = [float(x) for x in w.reshape(-1).tolist()]
    f64 = [float(x) for x in f.reshape(-1).tolist()]
    # c = float32(alpha * mean |W|) over the whole tensor; S = a - c * a / max(|W|, eps) in float32.
    c = np.float32(2.0 * math.fsum(abs(x) for x in w64) / len(w64))
    kept: set[int] = set()
    for r in range(ROWS):
        scores = []
        for j in range(COLS):
            i = r * COLS + j
            d = np.float32(np.float32(f64[i]) - np.float32(w64[i]))
            a = np.float32(abs(d))
            s = a - c * a / max(np.float32(abs(w64[i])), np.float32(1e-12))
            scores.append(0.0 if d == 0 else float(s))
        kept |= {r * COLS + j for j in _ranked(scores, 0, _count(COLS, 0.3))}
    assert torch.equal(out.view(torch.int16), _expected(w, f, kept).view(torch.int16))
    assert stats.kept == ROWS * _count(COLS, 0.3)


def test_dare_draws_at_their_flat_indices():
    w, f = _pair(3)
    pruner = _pruner("dare", "tensor", seed=11)
    out, stats = chunked.prune(pruner, "dare.t", w, f, torch.float32, None, CHUNK_BYTES)
    params = MethodParams(0.7, seed=11, tensor_name="dare.t")
    kept_draws = uniform_draws(params, ROWS * COLS) < 0.3
    w32, f32 = w.float().reshape(-1), f.float().reshape(-1)
    factor = np.float32(1 / 0.3)
    for i in range(ROWS * COLS):
        want = np.float32(w32[i]) + factor * (np.float32(f32[i]) - np.float32(w32[i]))
        got = out.reshape(-1)[i].item()
        assert got == (float(want) if kept_draws[i] else float(w32[i]))
    assert stats.kept == int(kept_draws.sum())


@pytest.mark.parametrize("method", ["fapm", "magnitude", "random"])
@pytest.mark.parametrize("scope", ["tensor", "row"])
def test_sparsity_zero_keeps_every_entry_without_ranking(method, scope):
    """A merge's pass-through (a ranking method at sparsity 0): F exactly, chunked or whole, and
    its statistics are every entry's (the shortcut skips the keys, not the counts)."""
    w, f = _pair(7)
    spec = JobSpec(base="/b", finetuned="/f", output="/o", method=method, sparsity=0.0,
                   scope=scope, kernel="torch")  # fmt: skip
    out, stats = chunked.prune(TensorPruner(spec), "t", w, f, torch.float32, None, CHUNK_BYTES)
    assert torch.equal(out, f.float())
    whole, whole_stats = TensorPruner(spec)._prune("t", w, f, torch.float32)
    assert torch.equal(whole, f.float()) and whole_stats == stats
    flat_d = (f.float() - w.float()).reshape(-1).tolist()
    assert stats.kept == stats.n == ROWS * COLS
    assert stats.kept_nonzero == stats.nonzero_delta == sum(1 for x in flat_d if x != 0)
    assert math.isclose(stats.l1_kept, math.fsum(abs(x) for x in flat_d), rel_tol=1e-12)


@pytest.mark.parametrize(("start", "stop"), [(0, 5), (1, 2), (1_048_570, 1_048_590), (3, 2**21)])
def test_draws_at_an_offset_are_the_whole_tensors(start, stop):
    params = MethodParams(0.5, seed=4, tensor_name="layer.weight")
    whole = uniform_draws(params, stop)
    assert np.array_equal(chunked.draws(params, start, stop), whole[start:stop])


def test_stats_stream_is_delta_stats(monkeypatch):
    monkeypatch.setattr(compose, "_STATS_CHUNK", 101)
    generator = torch.Generator().manual_seed(5)
    w32 = torch.randn(1000, generator=generator)
    w32[::17] = 0.0
    d32 = torch.randn(1000, generator=generator) * 1e-3
    d32[::7] = 0.0
    d32[5] = float("inf")
    f32 = w32 + d32
    keep = torch.rand(1000, generator=generator) < 0.4
    whole = delta_stats(w32, f32, d32, keep)
    stream = StatsStream()
    for start, stop in [(0, 13), (13, 250), (250, 251), (251, 755), (755, 1000)]:
        part = slice(start, stop)
        stream.feed(w32[part], f32[part], d32[part], keep[part])
    assert stream.result() == whole
    # The counts against a plain loop (the float sums are delta_stats' own windows, above).
    assert whole.kept == sum(bool(x) for x in keep)
    assert whole.nonfinite == sum(1 for x in f32.tolist() if not math.isfinite(x))


@pytest.mark.parametrize("method", ["fapm", "random", "magnitude"])
def test_key_chunks_are_the_whole_tensors_keys(method):
    w, f = _pair(6)
    pruner = _pruner(method, "model", **({"alpha": 0.5} if method == "fapm" else {}))
    task = TensorTask("t", "prune", "", tuple(f.shape), "BF16", base_name="t")
    whole = pruner.order_keys(task, w, f).reshape(-1)
    pieces = list(chunked.order_key_chunks(pruner, "t", w, f, CHUNK_BYTES))
    assert len(pieces) == math.ceil(ROWS * COLS / 64)
    assert torch.equal(torch.cat(pieces), whole)
