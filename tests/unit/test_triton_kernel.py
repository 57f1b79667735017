"""The Triton kernel against the torch path: output bytes bit for bit, statistics exactly.

On CPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be set when the kernel
module is imported (`triton.jit` picks compiled or interpreted then), so this module sets it,
(re)imports `triton_select`, and puts the environment back. The interpreter is slow (its cost grows
with the number of tiles): tensors here are small, and `block` is small enough that most of them
still span several tiles.

The default selection is the sampled bracket (sample, one scan collecting the candidates inside
the bracket, exact select among them); the radix select is its fallback. Every branch of both is
checked against the torch path: the sampled path on its own (with `info` saying which path ran),
brackets forced onto the k-th key, beside it, around it and past it (monkeypatched `_bracket` /
`_rebracket`), the candidate buffer overflowing (`_cap`), and `select="radix"`.

Triton also reads the variable while interpreted kernels run, so a fixture sets it again for
each test of this file.

GPU tests (marker `gpu`) skip without CUDA. With CUDA they re-run this file's `gpu` tests in a
subprocess with FAPM_TRITON_COMPILED=1 and no TRITON_INTERPRET, so the compiled kernels run.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

_COMPILED = os.environ.get("FAPM_TRITON_COMPILED") == "1"
_saved_interpret = os.environ.get("TRITON_INTERPRET")
if not _COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.models import load_state_dict  # noqa: E402
from tests.unit.test_cpu_fused import assert_stats, ks_for, pair  # noqa: E402
from worker.engine.compose import delta_stats  # noqa: E402
from worker.engine.kernels import triton_select  # noqa: E402
from worker.engine.methods.base import MethodParams  # noqa: E402
from worker.engine.methods.fapm import Fapm  # noqa: E402
from worker.engine.methods.magnitude import Magnitude  # noqa: E402
from worker.engine.pipeline import run_prune  # noqa: E402
from worker.engine.plan import TensorTask  # noqa: E402
from worker.engine.select import keep_count, order_keys, top_k_mask  # noqa: E402
from worker.engine.tensor_pruner import TensorPruner  # noqa: E402
from worker.spec import JobSpec  # noqa: E402

if not _COMPILED and triton_select.HAVE_TRITON and not triton_select.interpreting():
    # Imported earlier in this process without TRITON_INTERPRET: build the kernels again.
    triton_select = importlib.reload(triton_select)
if _saved_interpret is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _saved_interpret

REPO = Path(__file__).resolve().parents[2]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
METHODS = ("fapm", "magnitude")
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}

# scripts/setup installs the `gpu` extra (triton) everywhere, so these tests run on CPU in CI.
assert triton_select.HAVE_TRITON, "triton is missing: run scripts/setup (the gpu extra)"
interpreted = pytest.mark.skipif(
    _COMPILED, reason="interpreter tests (this run uses the compiled kernels)"
)


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    """Triton also reads TRITON_INTERPRET while interpreted kernels run (lazy imports check
    it), so it is set during each test of this file, and only then: other tests in the same
    session (and their subprocesses) see the environment they started with."""
    if not _COMPILED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def torch_path(method: str, w: torch.Tensor, f: torch.Tensor, k: int, alpha: float):
    """The reference, on whatever device w and f are: scores -> order keys -> exact top-k ->
    select (on the raw bits, as compose_output's torch.where), and delta_stats."""
    w32 = w.float().reshape(1, -1)
    f32 = f.float().reshape(1, -1)
    d32 = f32 - w32
    scorer = Fapm() if method == "fapm" else Magnitude()
    scores = scorer.scores(w32, d32, MethodParams(sparsity=0.5, alpha=alpha))
    keep = top_k_mask(order_keys(scores).view(1, -1), k)
    bits = BITS[f.dtype]
    out = torch.where(keep, f.reshape(1, -1).view(bits), w.reshape(1, -1).view(bits))
    return keep.reshape(-1), out.reshape(-1), delta_stats(w32, f32, d32, keep)


def ref_keys(method: str, w: torch.Tensor, f: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """The torch path's int32 order keys, flat."""
    w32 = w.float().reshape(1, -1)
    scorer = Fapm() if method == "fapm" else Magnitude()
    scores = scorer.scores(w32, f.float().reshape(1, -1) - w32, MethodParams(0.5, alpha=alpha))
    return order_keys(scores).reshape(-1)


def kth_key(method, w, f, k, alpha=1.0) -> int:
    return int(torch.sort(ref_keys(method, w, f, alpha), descending=True).values[k - 1])


def assert_same(
    method, w, f, k, alpha=1.0, block=256, programs=3, info=None, select="sampled", cap=None
):
    """The kernel's output bits and statistics equal the torch path's; returns its keep mask.
    `info` (a dict) receives what the kernel did; `select` and `cap` are passed on."""
    out = torch.empty_like(f)
    stats = triton_select.triton_prune(
        method, w, f, k, alpha, out, block, programs, select=select, info=info, _cap=cap
    )
    keep, want, ref_stats = torch_path(method, w, f, k, alpha)
    bits = BITS[f.dtype]
    got = out.reshape(-1).view(bits)
    if not torch.equal(got, want):
        bad = (got != want).nonzero().reshape(-1)
        pytest.fail(
            f"{method} {f.dtype} n={w.numel()} k={k} block={block}: {len(bad)} entries differ, "
            f"first {bad[:5].tolist()}"
        )
    # The mask as the output shows it (where W and F have equal bits the output cannot tell).
    differs = f.reshape(-1).view(bits) != w.reshape(-1).view(bits)
    assert torch.equal(got[differs] == f.reshape(-1).view(bits)[differs], keep[differs])
    assert stats.kept == k == int(keep.sum())
    assert_stats(stats, ref_stats)
    return keep


def levels_pair(n: int, dtype: torch.dtype, seed: int = 11):
    """W and F from a few levels: zeros in W (huge FAPM ratio) and in D (score 0), -0.0 against
    +0.0, and long tie groups everywhere."""
    g = torch.Generator().manual_seed(seed)
    levels_w = torch.tensor([-0.02, -0.0, 0.0, 0.01, 0.02, 0.04])
    levels_d = torch.tensor([0.0, 0.0, 0.0, 0.005, -0.005, 0.01])
    w = levels_w[torch.randint(0, 6, (n,), generator=g)]
    f = w + levels_d[torch.randint(0, 6, (n,), generator=g)]
    w, f = w.to(dtype), f.to(dtype)
    f[(w == 0) & (f == 0)] = -0.0
    return w, f


def nan_pair(n: int, dtype: torch.dtype, seed: int = 5):
    """A random pair with NaN and +-inf scattered in F (one in W would make mean|W| and so
    every fapm score non-finite: test_nan_inf has that): NaN and finite scores mixed."""
    w, f = pair(n, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    idx = torch.randint(0, n, (n // 10,), generator=g)
    f[idx] = specials[torch.randint(0, 3, idx.shape, generator=g)]
    return w, f


def equal_pair(n: int, dtype: torch.dtype):
    """Every |D| (and so every score) equal: one tie group of n."""
    w = torch.full((n,), 0.5, dtype=dtype)
    f = torch.where(torch.arange(n) % 2 == 0, 0.75, 0.25).to(dtype)
    return w, f


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_random_sizes_and_ks(method, dtype, n):
    """Sizes that are not multiples of the tile, k = 0, 1, n/2, n - 1, n and the 90% case."""
    w, f = pair(n, dtype, seed=n)
    for k in ks_for(n):
        assert_same(method, w, f, k)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_ties_and_zeros(method, dtype):
    """Values from a tiny set: long tie groups at the threshold split across tiles, zeros in W
    (huge FAPM ratio) and in D (score 0), -0.0 against +0.0."""
    n = 1001
    w, f = levels_pair(n, dtype)
    assert int((w == 0).sum()) > n // 4 and int((f == w).sum()) > n // 3
    for k in sorted({*ks_for(n), n // 3, n // 4, n // 7, 2 * n // 3}):
        assert_same(method, w, f, k, block=512)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_tie_group_keeps_the_lowest_flat_indices(dtype):
    """Every score equal: exactly the first k entries in flat order are kept, whatever the tile
    boundaries (an independent check of the tie rank across tiles)."""
    n = 300
    w, f = equal_pair(n, dtype)  # |D| = 0.25 everywhere
    t = int(ref_keys("magnitude", w, f)[0])
    for k in (1, 64, 65, 299):
        info = {}
        keep = assert_same("magnitude", w, f, k, block=64, info=info)
        assert torch.equal(keep, torch.arange(n) < k)
        # The sample sees one key: it is a bound of the bracket (the other is the int32
        # extreme where k is near the end), the split comes from the scan's per-tile counts
        # (no candidates, no extra pass).
        assert info["path"] == "sampled" and t in info["brackets"][0]
        assert info["passes"] == ["sample", "scan", "write"]
    keep = assert_same("fapm", w, f, 150, block=64)
    assert torch.equal(keep, torch.arange(n) < 150)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_two_d_and_alpha(dtype):
    w, f = pair(13 * 97, dtype, seed=3, shape=(13, 97))
    for alpha in (0.5, 3.0):
        assert_same("fapm", w, f, keep_count(w.numel(), 0.1), alpha, block=512)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_nan_inf(method, dtype):
    """NaN scores rank lowest; inf and NaN in W and F; non-finite counted in the statistics."""
    n = 600
    w, f = pair(n, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    for t in (w, f):
        idx = torch.randint(0, n, (15,), generator=g)
        t[idx] = specials[torch.randint(0, 3, idx.shape, generator=g)]
    for k in ks_for(n):
        assert_same(method, w, f, k)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_k_th_score_is_nan(dtype):
    """More NaN scores than n - k: the k-th key is the NaN key, its ties split by index."""
    n = 600
    w, f = pair(n, dtype, seed=8)
    f[: 2 * n // 3] = float("nan")
    for k in (n // 2, n - 5):
        for method in METHODS:
            assert_same(method, w, f, k)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormals(dtype):
    """Subnormal W and F: fp16 subnormal decoding, a huge FAPM ratio, no flush to zero."""
    n = 600
    g = torch.Generator().manual_seed(9)
    tiny = torch.finfo(dtype).smallest_normal
    w = (torch.randn(n, generator=g) * tiny).to(dtype)
    f = (w.float() + torch.randn(n, generator=g) * tiny * 0.25).to(dtype)
    assert int((w != 0).sum()) > n // 2
    for method in METHODS:
        for k in (1, keep_count(n, 0.1), n // 2):
            assert_same(method, w, f, k)


@interpreted
def test_distinct_exponents_stop_after_the_first_digit():
    """|D| = 2^-i: every value alone in its top-11-bit bin, so the first pass decides (the
    early exit), and the mask is the k largest."""
    n = 40
    w = torch.zeros(n, dtype=torch.float32)
    f = torch.tensor([2.0 ** -((7 * i) % n) for i in range(n)])
    for k in (1, 5, 39):
        keep = assert_same("magnitude", w, f, k)
        assert torch.equal(keep, f >= torch.sort(f, descending=True).values[k - 1])


@interpreted
def test_tile_size_and_grid_do_not_change_the_result():
    w, f = pair(700, torch.bfloat16, seed=21, noise=5e-4)
    k = keep_count(w.numel(), 0.2)
    outs = []
    for block, programs, select in ((64, 1, "sampled"), (128, 3, "radix"), (1024, 2, "sampled")):
        out, info = torch.empty_like(f), {}
        stats = triton_select.triton_prune(
            "fapm", w, f, k, 1.0, out, block, programs, select=select, info=info
        )
        outs.append((out.view(torch.int16), stats, info))
    for out, stats, _ in outs[1:]:
        assert torch.equal(out, outs[0][0])
        assert stats == outs[0][1]
    # The sample does not depend on the tiles either: the same bracket.
    assert outs[0][2]["brackets"] == outs[2][2]["brackets"] and outs[1][2]["path"] == "radix"


# ------------------------------------------------------------------------------------------------
# the sampled bracket: every branch, and the radix fallback
# ------------------------------------------------------------------------------------------------

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def neighbours(keys: torch.Tensor, t: int) -> tuple[int, int]:
    """The largest key below t and the smallest above it (the int32 extremes when none)."""
    below, above = keys[keys < t], keys[keys > t]
    return (
        int(below.max()) if below.numel() else INT32_MIN,
        int(above.min()) if above.numel() else INT32_MAX,
    )


def force_bracket(monkeypatch, lo: int, hi: int) -> None:
    """The kernel's first bracket becomes [lo, hi] (the sample is still taken)."""
    monkeypatch.setattr(triton_select, "_bracket", lambda keys, n, k: (lo, hi, float(n)))


SELECT_CASES = {  # small: the interpreter's cost grows with the tiles (block 256 below: 3)
    "random": lambda dtype: pair(601, dtype, seed=4),
    "levels": lambda dtype: levels_pair(601, dtype),
    "nan": lambda dtype: nan_pair(601, dtype),
    "equal": lambda dtype: equal_pair(300, dtype),
}


def select_cases(offset: int = 0):
    """(name, dtype, w, f) for each case, the dtypes rotating with `offset` so that every
    case meets every dtype across a test's parameters."""
    for i, (name, make) in enumerate(SELECT_CASES.items()):
        dtype = DTYPES[(i + offset) % len(DTYPES)]
        yield name, dtype, *make(dtype)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_sampled_path_scans_once(method, dtype):
    """n = 1001 (not a multiple of the tile), every k: for 0 < k < n the sampled bracket holds
    the k-th key and decides (no histogram or tie pass: one scan before the write), and across
    the k it is found among the candidates as well as at a bound of the bracket."""
    n = 1001
    w, f = pair(n, dtype, seed=4)
    inside = 0
    for k in sorted({*ks_for(n), 2, n // 3, n // 5, n - 2}):
        info = {}
        assert_same(method, w, f, k, info=info)
        if k in (0, n):
            assert info["path"] == ("none" if k == 0 else "all")
            assert info["passes"] == ["write"]
            continue
        assert info["path"] == "sampled", (k, info)
        want = ["abs sum"] * (method == "fapm") + ["sample", "scan"]
        assert info["passes"][: len(want)] == want and info["passes"][-1] == "write"
        inside += "sort candidates" in info["passes"]
        assert info["bytes"] > 0 and info["fallback"] is None
    assert inside > 0


WHERE = ("single", "t_at_hi", "t_at_lo", "t_inside", "everything", "t_at_hi_only_ties")


@interpreted
@pytest.mark.parametrize("where", WHERE)
def test_brackets_on_and_around_the_kth_key(monkeypatch, where):
    """Brackets forced onto the k-th key t and beside it, on tensors full of ties, zeros, NaN
    and inf: t at hi (tie rank from the scan's counts of key == hi), at lo (key == lo), or
    inside (the candidates' sort gives t and the index of the last kept tie), split tie groups
    in every position. Always the torch path's bytes, never a fallback."""
    for name, _dtype, w, f in select_cases(WHERE.index(where)):
        n = w.numel()
        for method in METHODS:
            keys = ref_keys(method, w, f)
            for k in (1, n // 10, n // 3, n - 1):
                t = kth_key(method, w, f, k)
                below, above = neighbours(keys, t)
                lo, hi = {
                    "single": (t, t),
                    "t_at_hi": (below, t),
                    "t_at_lo": (t, above),
                    "t_inside": (below, above),
                    "everything": (INT32_MIN, INT32_MAX),
                    "t_at_hi_only_ties": (max(t - 1, INT32_MIN), t),
                }[where]
                force_bracket(monkeypatch, lo, hi)
                info = {}
                assert_same(method, w, f, k, info=info)
                assert info["path"] == "sampled" and info["brackets"] == [(lo, hi)], (name, k)
                if lo < t < hi:
                    assert "sort candidates" in info["passes"], (name, k)


@interpreted
@pytest.mark.parametrize("side", ["t_above", "t_below"])
def test_a_missed_bracket_is_widened_from_the_sample(monkeypatch, side):
    """A first bracket wholly below t (more than k keys above it) or wholly above t: the scan
    says so, the second bracket comes from the same sample, _WIDEN times as wide, starting at
    the old bound, and decides; one scan more, no radix pass."""
    for offset in (0, 1):
        for name, dtype, w, f in select_cases(offset + 2 * (side == "t_below")):
            if name == "equal":
                continue  # one key: no bracket can miss it
            n = w.numel()
            for method in METHODS:
                keys = ref_keys(method, w, f)
                for k in (1, n // 2, n - 1):
                    t = kth_key(method, w, f, k)
                    below, above = neighbours(keys, t)
                    if (side == "t_above" and below == INT32_MIN) or (
                        side == "t_below" and above == INT32_MAX
                    ):
                        continue  # no key on that side of t to put a bracket on
                    lo, hi = (INT32_MIN, below) if side == "t_above" else (above, INT32_MAX)
                    force_bracket(monkeypatch, lo, hi)
                    info = {}
                    assert_same(method, w, f, k, info=info)
                    assert info["brackets"][0] == (lo, hi) and len(info["brackets"]) == 2
                    assert info["passes"].count("scan") == 2
                    if name == "random":  # the sample is representative: the second one holds
                        assert info["path"] == "rebracketed", (name, dtype, k, info)
                    else:  # tie groups can fool the sample: then the radix select decides
                        assert info["path"] in ("rebracketed", "radix"), (name, dtype, k, info)


@interpreted
@pytest.mark.parametrize("method", METHODS)
def test_bracket_missed_twice_falls_back_to_radix(monkeypatch, method):
    for name, _dtype, w, f in select_cases(METHODS.index(method)):
        if name == "equal":
            continue
        keys = ref_keys(method, w, f)
        for k in (1, w.numel() // 2):
            t = kth_key(method, w, f, k)
            below, above = neighbours(keys, t)
            wrong = (above, INT32_MAX) if above != INT32_MAX else (INT32_MIN, below)
            force_bracket(monkeypatch, *wrong)
            monkeypatch.setattr(triton_select, "_rebracket", lambda *a, wrong=wrong, **kw: wrong)
            info = {}
            assert_same(method, w, f, k, info=info)
            assert info["path"] == "radix" and info["fallback"] == "bracket missed twice"
            assert info["passes"].count("scan") == 2 and "histogram 1" in info["passes"]


@interpreted
@pytest.mark.parametrize("method", METHODS)
def test_candidate_overflow_falls_back_to_radix(monkeypatch, method):
    """More candidates inside the bracket than the buffer holds, with t among them: the radix
    select decides (exactly); with t at a bound the overflow does not matter."""
    for offset in (0, 1):
        for name, dtype, w, f in select_cases(offset + 2 * METHODS.index(method)):
            n = w.numel()
            for k in (n // 10, n - 1):
                t = kth_key(method, w, f, k)
                for lo, hi in ((INT32_MIN, INT32_MAX), (t, INT32_MAX)):
                    force_bracket(monkeypatch, lo, hi)
                    info = {}
                    assert_same(method, w, f, k, info=info, cap=2)
                    if lo < t < hi:
                        assert info["candidates"] > 2, (name, dtype, k, info)
                        assert info["path"] == "radix", (name, dtype, k, info)
                        assert info["fallback"] == "candidates overflowed"
                    else:
                        assert info["path"] == "sampled", (name, dtype, k, info)


@interpreted
def test_default_bracket_with_a_tiny_buffer_is_still_exact():
    """The sample's own bracket with room for 3 candidates: whichever path that takes."""
    paths = set()
    for name, _dtype, w, f in select_cases():
        n = w.numel()
        for method in METHODS:
            for k in (1, n // 10, n // 2, n - 1):
                info = {}
                assert_same(method, w, f, k, info=info, cap=3)
                paths.add((name, info["path"]))
    assert ("random", "radix") in paths, paths


@interpreted
@pytest.mark.parametrize("method", METHODS)
def test_radix_select_alone(method):
    """`select="radix"` (the fallback on its own) on the same tensors."""
    for offset in (0, 1, 2):
        for name, _dtype, w, f in select_cases(offset):
            n = w.numel()
            for k in (1, n // 10, n // 2) if offset else (0, n // 3, n):
                info = {}
                assert_same(method, w, f, k, info=info, select="radix")
                assert info["path"] == ("none" if k == 0 else "all" if k == n else "radix")
                assert "scan" not in info["passes"] and "sample" not in info["passes"], name


@interpreted
def test_sample_plan_stays_inside_the_tensor():
    """Every run of the sample lies inside its window, and the sample is the whole tensor when
    it is tiny."""
    for n in (1, 7, 64, 65, 1000, 4096, 10**6, 10**9):
        runs, stride, span, m = triton_select._sample_plan(n)
        assert m == (n if n <= triton_select.FULL_SAMPLE else runs * triton_select.RUN)
        assert span >= 1 and (runs - 1) * stride + span - 1 + triton_select.RUN <= max(
            n, runs * triton_select.RUN
        )
        assert m <= max(n // 4, n if n <= triton_select.FULL_SAMPLE else 0)


@interpreted
def test_bad_arguments_are_errors():
    w, f = pair(100, torch.bfloat16)
    with pytest.raises(ValueError, match="unsupported method"):
        triton_select.triton_prune("random", w, f, 5, 1.0, torch.empty_like(f))
    with pytest.raises(ValueError, match="f is"):
        triton_select.triton_prune("fapm", w, f.float(), 5, 1.0, torch.empty_like(f))
    with pytest.raises(ValueError, match="power of two"):
        triton_select.triton_prune("fapm", w, f, 5, 1.0, torch.empty_like(f), block=100)
    with pytest.raises(ValueError, match="unknown select"):
        triton_select.triton_prune("fapm", w, f, 5, 1.0, torch.empty_like(f), select="sort")


@interpreted
@pytest.mark.parametrize("pair_name", ["bf16_pair", "fp32_pair"])
@pytest.mark.parametrize("method", METHODS)
def test_run_prune_with_kernel_triton_equals_kernel_torch(request, tmp_path, pair_name, method):
    """End to end on a tiny Llama pair: the same files and totals as the torch path."""
    pair_ = request.getfixturevalue(pair_name)
    reports, states = {}, {}
    for kernel in ("torch", "triton"):
        spec = JobSpec(
            base=str(pair_.base),
            finetuned=str(pair_.finetuned),
            output=str(tmp_path / kernel),
            method=method,
            sparsity=0.9,
            kernel=kernel,
            device="cpu",
        )
        reports[kernel] = run_prune(spec).report
        states[kernel] = load_state_dict(tmp_path / kernel)
    assert reports["triton"]["implementation"] == "triton-interpreter"
    assert reports["torch"]["implementation"] == "torch-cpu"
    assert set(states["triton"]) == set(states["torch"])
    for name, want in states["torch"].items():
        got = states["triton"][name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.view(BITS[got.dtype]), want.view(BITS[want.dtype])), name
    for key in ("n", "kept", "nonzero_delta", "kept_nonzero", "w_zero", "nonfinite"):
        assert reports["triton"]["totals"][key] == reports["torch"]["totals"][key], key
    for key in ("l1_kept_ratio", "l2_kept_ratio"):
        assert reports["triton"]["totals"][key] == pytest.approx(
            reports["torch"]["totals"][key], rel=1e-9
        )


def _spec(**kw) -> JobSpec:
    return JobSpec(base="b", finetuned="f", output="o", **kw)


@interpreted
def test_kernel_selection_on_cpu():
    # auto on CPU never picks the interpreter; other methods and scopes keep the torch path.
    assert TensorPruner(_spec(kernel="auto", device="cpu")).implementation in ("numba", "torch-cpu")
    assert TensorPruner(_spec(kernel="triton", device="cpu")).implementation == (
        "triton-interpreter"
    )
    for kw in ({"method": "random"}, {"scope": "row"}, {"scale": 0.5}):
        pruner = TensorPruner(_spec(kernel="triton", device="cpu", **kw))
        assert pruner.implementation == "torch-cpu", kw


@interpreted
def test_overlap_transfers_on_cpu_is_a_pass_through_that_closes_its_source():
    pruner = TensorPruner(_spec(kernel="triton", device="cpu"))
    assert pruner.stager is None
    closed = []

    def source():
        try:
            yield from [("a", (None, torch.ones(1))), ("b", (None, torch.zeros(2)))]
        finally:
            closed.append(True)

    got = pruner.overlap_transfers(source())
    assert next(got)[0] == "a"
    got.close()
    assert closed == [True]


def test_kernel_triton_without_cuda_or_interpreter_is_a_clear_error():
    code = (
        "from worker.spec import JobSpec\n"
        "from worker.engine.tensor_pruner import TensorPruner\n"
        "TensorPruner(JobSpec(base='b', finetuned='f', output='o', kernel='triton', device='cpu'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "DeviceUnavailable: kernel: triton needs a CUDA device" in proc.stderr
    assert "TRITON_INTERPRET=1" in proc.stderr


# ------------------------------------------------------------------------------------------------
# GPU: the compiled kernels (run them whenever a machine with a GPU is available)
# ------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _in_compiled_subprocess(test_name: str) -> None:
    """Run one test of this file in a process where the kernels are compiled, not interpreted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FAPM_TRITON_COMPILED"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", f"{__file__}::{test_name}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernel_matches_the_cpu_torch_path(dtype):
    if not _COMPILED:
        _in_compiled_subprocess(f"test_gpu_kernel_matches_the_cpu_torch_path[{dtype}]")
        return
    cases = [pair(n, dtype, seed=n) for n in (1, 4097, 1_000_003)]
    g = torch.Generator().manual_seed(11)
    levels_w = torch.tensor([-0.02, -0.0, 0.0, 0.01, 0.02, 0.04])
    levels_d = torch.tensor([0.0, 0.0, 0.0, 0.005, -0.005, 0.01])
    w = levels_w[torch.randint(0, 6, (300_001,), generator=g)]
    cases.append((w.to(dtype), (w + levels_d[torch.randint(0, 6, w.shape, generator=g)]).to(dtype)))
    tiny = torch.finfo(dtype).smallest_normal
    w = (torch.randn(20_000, generator=g) * tiny).to(dtype)
    cases.append((w, (w.float() + torch.randn(20_000, generator=g) * tiny * 0.25).to(dtype)))
    cases.append(nan_pair(200_003, dtype))
    # The default (sampled bracket), the radix select alone, and the sampled bracket with a
    # candidate buffer too small (the radix fallback wherever t is inside the bracket).
    variants = ({}, {"select": "radix"}, {"_cap": 2})
    for w, f in cases:
        n = w.numel()
        wd, fd = w.cuda(), f.cuda()
        for method in METHODS:
            for k in sorted({*ks_for(n), n // 3}):
                _, want, ref_stats = torch_path(method, w, f, k, 1.0)  # on the CPU
                for kw in variants:
                    out, info = torch.empty_like(fd), {}
                    stats = triton_select.triton_prune(method, wd, fd, k, 1.0, out, info=info, **kw)
                    got = out.cpu().reshape(-1).view(BITS[dtype])
                    assert torch.equal(got, want), (method, dtype, n, k, kw, info)
                    assert_stats(stats, ref_stats)
                    if not kw and n == 1_000_003 and 0 < k < n:
                        assert info["path"] == "sampled", (method, dtype, k, info)


@pytest.mark.gpu
@needs_cuda
def test_gpu_run_prune_streams_and_equals_the_cpu(bf16_pair, tmp_path):
    """kernel triton on CUDA end to end (pinned side-stream copies taken on demand: run_prune
    does not call overlap_transfers yet) gives the CPU torch path's bytes; overlap_transfers
    hands out the same items in order with their copies started one ahead."""
    if not _COMPILED:
        _in_compiled_subprocess("test_gpu_run_prune_streams_and_equals_the_cpu")
        return
    states = {}
    for kernel, device in (("torch", "cpu"), ("triton", "cuda")):
        spec = JobSpec(
            base=str(bf16_pair.base),
            finetuned=str(bf16_pair.finetuned),
            output=str(tmp_path / kernel),
            sparsity=0.9,
            kernel=kernel,
            device=device,
        )
        report = run_prune(spec).report
        states[kernel] = load_state_dict(tmp_path / kernel)
    assert report["implementation"] == "triton"
    for name, want in states["torch"].items():
        assert torch.equal(states["triton"][name].view(torch.int16), want.view(torch.int16)), name

    # The stager on its own: copies started for several tensors, taken in order.
    pruner = TensorPruner(_spec(kernel="triton", device="cuda"))
    assert pruner.stager is not None
    pairs = [pair(n, torch.bfloat16, seed=n) for n in (5000, 70_001, 3)]
    for i, (w, f) in enumerate(pairs):
        pruner.stager.prefetch(f"t{i}", w, f)
    for i, (w, f) in enumerate(pairs):
        wd, fd = pruner.stager.take(f"t{i}", w, f)
        assert torch.equal(wd.cpu().view(torch.int16), w.view(torch.int16))
        assert torch.equal(fd.cpu().view(torch.int16), f.view(torch.int16))
    assert not pruner.stager.pending

    # overlap_transfers: the copy of item i+1 is pending before item i is handed out.
    tasks = [
        TensorTask(f"o{i}", "prune", "", tuple(w.shape), "BF16") for i, (w, _) in enumerate(pairs)
    ]
    seen = []
    for task, (w, f) in pruner.overlap_transfers(iter(list(zip(tasks, pairs, strict=True)))):
        seen.append(task.name)
        if len(seen) < len(tasks):
            assert f"o{len(seen)}" in pruner.stager.pending
        out, stats = pruner.run(task, w, f)
        _, want, ref_stats = torch_path(
            "fapm", w, f, keep_count(w.numel(), pruner.spec.density), 1.0
        )
        assert torch.equal(out.reshape(-1).view(torch.int16), want)
        assert_stats(stats, ref_stats)
    assert seen == ["o0", "o1", "o2"] and not pruner.stager.pending
