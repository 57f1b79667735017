"""The Triton kernel against the torch path: output bytes bit for bit, statistics exactly.

On CPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be set when the kernel
module is imported (`triton.jit` picks compiled or interpreted then), so this module sets it,
(re)imports `triton_select`, and puts the environment back. The interpreter is slow (its cost grows
with the number of tiles): tensors here are small, and `block` is small enough that most of them
still span several tiles.

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


def assert_same(method, w, f, k, alpha=1.0, block=256, programs=3):
    """The kernel's output bits and statistics equal the torch path's; returns its keep mask."""
    out = torch.empty_like(f)
    stats = triton_select.triton_prune(method, w, f, k, alpha, out, block=block, programs=programs)
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
    g = torch.Generator().manual_seed(11)
    levels_w = torch.tensor([-0.02, -0.0, 0.0, 0.01, 0.02, 0.04])
    levels_d = torch.tensor([0.0, 0.0, 0.0, 0.005, -0.005, 0.01])
    w = levels_w[torch.randint(0, 6, (n,), generator=g)]
    f = w + levels_d[torch.randint(0, 6, (n,), generator=g)]
    w, f = w.to(dtype), f.to(dtype)
    f[(w == 0) & (f == 0)] = -0.0
    assert int((w == 0).sum()) > n // 4 and int((f == w).sum()) > n // 3
    for k in sorted({*ks_for(n), n // 3, n // 4, n // 7, 2 * n // 3}):
        assert_same(method, w, f, k, block=512)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_tie_group_keeps_the_lowest_flat_indices(dtype):
    """Every score equal: exactly the first k entries in flat order are kept, whatever the tile
    boundaries (an independent check of the tie rank across tiles)."""
    n = 300
    w = torch.full((n,), 0.5, dtype=dtype)
    f = torch.where(torch.arange(n) % 2 == 0, 0.75, 0.25).to(dtype)  # |D| = 0.25 everywhere
    for k in (1, 64, 65, 299):
        keep = assert_same("magnitude", w, f, k, block=64)
        assert torch.equal(keep, torch.arange(n) < k)
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
    for block, programs in ((64, 1), (128, 3), (1024, 2)):
        out = torch.empty_like(f)
        stats = triton_select.triton_prune("fapm", w, f, k, 1.0, out, block, programs)
        outs.append((out.view(torch.int16), stats))
    for out, stats in outs[1:]:
        assert torch.equal(out, outs[0][0])
        assert stats == outs[0][1]


@interpreted
def test_bad_arguments_are_errors():
    w, f = pair(100, torch.bfloat16)
    with pytest.raises(ValueError, match="unsupported method"):
        triton_select.triton_prune("random", w, f, 5, 1.0, torch.empty_like(f))
    with pytest.raises(ValueError, match="f is"):
        triton_select.triton_prune("fapm", w, f.float(), 5, 1.0, torch.empty_like(f))
    with pytest.raises(ValueError, match="power of two"):
        triton_select.triton_prune("fapm", w, f, 5, 1.0, torch.empty_like(f), block=100)


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
    assert "ValueError: kernel: triton needs a CUDA device" in proc.stderr
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
    for w, f in cases:
        n = w.numel()
        for method in METHODS:
            for k in sorted({*ks_for(n), n // 3}):
                _, want, ref_stats = torch_path(method, w, f, k, 1.0)  # on the CPU
                wd, fd = w.cuda(), f.cuda()
                out = torch.empty_like(fd)
                stats = triton_select.triton_prune(method, wd, fd, k, 1.0, out)
                got = out.cpu().reshape(-1).view(BITS[dtype])
                assert torch.equal(got, want), (method, dtype, n, k)
                assert_stats(stats, ref_stats)


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
