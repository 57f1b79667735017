"""SparseGPT (worker/compress/sparsegpt.py) against an independent transcription of the published
algorithm, and its properties.

`reference_fasterprune` below transcribes `SparseGPT.fasterprune` of IST-DASLab/sparsegpt (the
loop the Wanda repo and llm-compressor copy) in numpy float64, plain and slow: dead inputs, damping,
the inverse by `np.linalg.inv` (not the product's Cholesky inverse), the upper Cholesky factor of
it, blocks, the `<=` threshold at the `int(numel * sparsity)`-th sorted metric, the per-group
smallest for N:M, and the OBS updates column by column. The data have no exact ties (except the
zeros of dead inputs, fewer than a block's count), so its `<=` and the product's "count, ties to
the lower index" select the same entries; ties have their own test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.compress.sparsegpt import (
    HessianAccumulator,
    SparseGPTNumericalError,
    sparsegpt_prune,
)

# ---------------------------------------------------------------------------------------------
# the independent reference
# ---------------------------------------------------------------------------------------------


def reference_fasterprune(
    weight: np.ndarray,
    hessian: np.ndarray,
    sparsity: float,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    factor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """fasterprune in float64. prunen = entries PRUNED per group of prunem (the reference's sense).
    `factor` multiplies the metric of column j by factor[j]^2 (the task-aware fusion). Returns
    (weights, keep mask)."""
    W = np.array(weight, dtype=np.float64)
    H = np.array(hessian, dtype=np.float64)
    rows, cols = W.shape
    dead = np.diag(H) == 0
    for j in range(cols):
        if dead[j]:
            H[j, j] = 1.0
            W[:, j] = 0.0
    damp = percdamp * np.mean(np.diag(H))
    for j in range(cols):
        H[j, j] += damp
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper U with inv(H) = U^T U
    f2 = np.ones(cols) if factor is None else np.asarray(factor, dtype=np.float64) ** 2

    pruned = np.zeros((rows, cols), dtype=bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        dg = np.diag(Hinv1)
        if prunen == 0:
            tmp = W1**2 / dg[None, :] ** 2 * f2[None, i1:i2]
            thresh = np.sort(tmp.flatten())[int(tmp.size * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = np.zeros_like(W1, dtype=bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : i + prunem] ** 2 / dg[None, i : i + prunem] ** 2
                tmp = tmp * f2[None, i1 + i : i1 + i + prunem]
                for r in range(rows):
                    for c in np.argsort(tmp[r], kind="stable")[:prunen]:
                        mask1[r, i + c] = True
            q = w.copy()
            q[mask1[:, i]] = 0.0
            Q1[:, i] = q
            err1 = (w - q) / d
            for c in range(i, i2 - i1):
                W1[:, c] -= err1 * Hinv1[i, c]
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, ~pruned


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _inputs(seed: int, d_in: int, sequences: int = 6, tokens: int = 40) -> list[torch.Tensor]:
    """Correlated activations (a random mix plus a few loud channels), as LLM inputs are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    mix += torch.eye(d_in, dtype=torch.float64)
    loud = torch.ones(d_in, dtype=torch.float64)
    loud[torch.randperm(d_in, generator=g)[: max(1, d_in // 16)]] = 8.0
    return [
        (torch.randn(tokens, d_in, generator=g, dtype=torch.float64) @ mix) * loud
        for _ in range(sequences)
    ]


def _hessian64(xs: list[torch.Tensor]) -> torch.Tensor:
    """2/N * sum over sequences of X^T X, directly in float64."""
    h = torch.zeros(xs[0].shape[1], xs[0].shape[1], dtype=torch.float64)
    for x in xs:
        h += x.to(torch.float64).T @ x.to(torch.float64)
    return 2 * h / len(xs)


def _case(
    seed: int, rows: int, d_in: int, dead: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    xs = _inputs(seed, d_in)
    for x in xs:
        x[:, list(dead)] = 0.0
    g = torch.Generator().manual_seed(seed + 1000)
    weight = torch.randn(rows, d_in, generator=g, dtype=torch.float64).to(torch.float32)
    return weight, _hessian64(xs).to(torch.float32), xs


CASES = [
    # (rows, d_in, blocksize, sparsity, pattern, dead inputs)
    (16, 64, 32, 0.5, None, ()),
    (16, 64, 32, 0.3, None, (3, 40, 41)),
    (24, 256, 128, 0.5, None, ()),
    (24, 256, 128, 0.7, None, (0, 130, 255)),
    (24, 200, 64, 0.6, None, (7,)),  # a narrower last block
    (16, 64, 32, 0.5, (2, 4), ()),
    (16, 64, 32, 0.5, (2, 4), (5, 6)),
    (24, 256, 128, 0.5, (4, 8), ()),
    (24, 256, 128, 0.5, (4, 8), (9, 200)),
]


def _ids(case: tuple) -> str:
    rows, d_in, bs, s, pattern, dead = case
    p = "unstructured" if pattern is None else f"{pattern[0]}of{pattern[1]}"
    return f"{rows}x{d_in}-b{bs}-{p}-s{s}-dead{len(dead)}"


def _reference(weight, hessian, sparsity, pattern, blocksize, factor=None):
    prunen, prunem = (0, 0) if pattern is None else (pattern[1] - pattern[0], pattern[1])
    return reference_fasterprune(
        weight.numpy(),
        hessian.to(torch.float64).numpy(),
        sparsity,
        prunen,
        prunem,
        blocksize,
        factor=None if factor is None else factor.numpy(),
    )


# ---------------------------------------------------------------------------------------------
# (a) the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_float64_run_equals_the_reference(case):
    """The float64 loop: masks identical; weights agree to 1e-10 of the largest weight (two float64
    evaluations of the same arithmetic, through different inverses: np.linalg.inv here, a Cholesky
    inverse there)."""
    rows, d_in, bs, s, pattern, dead = case
    weight, hessian, _ = _case(len(dead) + d_in, rows, d_in, dead)
    ref_w, ref_keep = _reference(weight, hessian, s, pattern, bs)
    out, keep = sparsegpt_prune(weight, hessian, s, pattern, bs, dtype=torch.float64)
    assert out.dtype == torch.float32 and keep.dtype == torch.bool
    np.testing.assert_array_equal(keep.numpy(), ref_keep)
    scale = np.abs(ref_w).max()
    np.testing.assert_allclose(
        out.numpy(), ref_w.astype(np.float32), rtol=0, atol=1e-10 * scale + 1e-30
    )
    assert (out[~keep] == 0).all()
    assert (out[:, list(dead)] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_float32_run_equals_the_reference_within_float32_noise(case):
    """The default float32 loop (the reference's precision): masks identical; weights within
    2e-5 of the largest weight. Each weight takes one float32 rounding (2^-24 ~ 6e-8 relative)
    per OBS update it receives, up to d_in of them, amplified by the spread of the inverse
    Hessian; on these cases the largest error measured 4e-7 (CPU), so 2e-5 leaves room for other
    kernels (CUDA) and is still four orders below the OBS updates themselves (1e-1 to 5e-1 of
    the largest weight here), so a wrong or missing update fails."""
    rows, d_in, bs, s, pattern, dead = case
    weight, hessian, _ = _case(len(dead) + d_in, rows, d_in, dead)
    ref_w, ref_keep = _reference(weight, hessian, s, pattern, bs)
    out, keep = sparsegpt_prune(weight, hessian, s, pattern, bs)
    np.testing.assert_array_equal(keep.numpy(), ref_keep)
    scale = np.abs(ref_w).max()
    np.testing.assert_allclose(out.numpy(), ref_w, rtol=0, atol=2e-5 * scale)
    assert (out[~keep] == 0).all()


@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["unstructured", "2of4"])
def test_column_factor_equals_the_reference_with_the_factor_in_the_metric(pattern):
    weight, hessian, _ = _case(7, 16, 64)
    factor = (
        torch.rand(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3 + 0.1
    )
    factor = factor.to(torch.float32)
    ref_w, ref_keep = _reference(weight, hessian, 0.5, pattern, 32, factor=factor)
    out, keep = sparsegpt_prune(
        weight, hessian, 0.5, pattern, 32, column_factor=factor, dtype=torch.float64
    )
    np.testing.assert_array_equal(keep.numpy(), ref_keep)
    np.testing.assert_allclose(
        out.numpy(), ref_w.astype(np.float32), rtol=0, atol=1e-10 * np.abs(ref_w).max()
    )
    # ...and the factor changed the mask (else the test above proves nothing about it).
    _, plain_keep = sparsegpt_prune(weight, hessian, 0.5, pattern, 32)
    assert not torch.equal(plain_keep, keep)


# ---------------------------------------------------------------------------------------------
# (b) achieved sparsity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.77, 0.9, 1.0])
@pytest.mark.parametrize(("d_in", "blocksize"), [(64, 32), (200, 64), (256, 128)])
def test_unstructured_count_per_block_is_the_references(sparsity, d_in, blocksize):
    rows = 24
    weight, hessian, _ = _case(11, rows, d_in, dead=(1,))
    out, keep = sparsegpt_prune(weight, hessian, sparsity, blocksize=blocksize)
    for i1 in range(0, d_in, blocksize):
        block = keep[:, i1 : i1 + blocksize]
        numel = block.numel()
        # the reference's `tmp <= sort(tmp)[int(numel * s)]`, without ties: int(numel * s) + 1
        assert int((~block).sum()) == min(int(numel * sparsity) + 1, numel)
    assert (out[~keep] == 0).all()


def test_zero_sparsity_prunes_nothing_and_leaves_the_weights():
    weight, hessian, _ = _case(5, 16, 64)
    out, keep = sparsegpt_prune(weight, hessian, 0.0, blocksize=32)
    assert keep.all()
    assert torch.equal(out, weight)


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_n_of_m_keeps_exactly_n_of_every_m(pattern):
    n, m = pattern
    weight, hessian, _ = _case(13, 24, 256, dead=(2, 3))
    out, keep = sparsegpt_prune(weight, hessian, 1 - n / m, pattern, 128)
    groups = keep.reshape(24, 256 // m, m).sum(dim=2)
    assert (groups == n).all()
    assert (out[~keep] == 0).all()
    live = torch.ones(256, dtype=torch.bool)
    live[[2, 3]] = False
    assert (out[:, live][keep[:, live]] != 0).all()  # kept live entries carry weight


# ---------------------------------------------------------------------------------------------
# (c) the OBS update helps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["unstructured", "2of4"])
def test_obs_update_reduces_the_reconstruction_error_of_plain_masking(pattern):
    weight, hessian, xs = _case(17, 24, 256)
    out, keep = sparsegpt_prune(weight, hessian, 0.5, pattern, 128)
    x = torch.cat(xs).to(torch.float64)
    w = weight.to(torch.float64)
    dense = x @ w.T
    obs = torch.linalg.norm(dense - x @ out.to(torch.float64).T)
    masked = torch.linalg.norm(dense - x @ (w * keep).T)
    assert obs < 0.8 * masked, (float(obs), float(masked))


# ---------------------------------------------------------------------------------------------
# (d) column_factor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["unstructured", "2of4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_column_factor_is_a_factor_of_ones_bit_for_bit(pattern, dtype):
    weight, hessian, _ = _case(19, 24, 256, dead=(4,))
    plain = sparsegpt_prune(weight, hessian, 0.5, pattern, 128, dtype=dtype)
    ones = sparsegpt_prune(
        weight, hessian, 0.5, pattern, 128, column_factor=torch.ones(256), dtype=dtype
    )
    assert torch.equal(plain[0], ones[0]) and torch.equal(plain[1], ones[1])


def test_a_large_column_factor_protects_its_columns():
    weight, hessian, _ = _case(23, 16, 64)
    factor = torch.ones(64)
    protected = [0, 9, 33, 63]
    factor[protected] = 1e4
    _, keep = sparsegpt_prune(weight, hessian, 0.5, blocksize=32, column_factor=factor)
    assert keep[:, protected].all()


# ---------------------------------------------------------------------------------------------
# ties, dead inputs, failures
# ---------------------------------------------------------------------------------------------


def test_ties_go_to_the_lower_index():
    """All metrics equal (equal weights, a diagonal Hessian: no OBS spill between columns)."""
    rows, d_in = 4, 16
    weight = torch.ones(rows, d_in)
    hessian = torch.eye(d_in) * 2
    _, keep = sparsegpt_prune(weight, hessian, 0.25, blocksize=8)
    count = int(32 * 0.25) + 1  # per block of 4 x 8, row-major
    for i1 in (0, 8):
        flat = keep[:, i1 : i1 + 8].flatten()
        assert not flat[:count].any() and flat[count:].all()
    _, keep = sparsegpt_prune(weight, hessian, 0.5, (2, 4), blocksize=8)
    assert torch.equal(keep[0], torch.tensor([False, False, True, True] * 4))
    assert (keep == keep[0]).all()


def test_dead_inputs_are_zeroed_and_the_rest_is_finite():
    weight, hessian, _ = _case(29, 16, 64, dead=(0, 31, 32, 63))
    out, _ = sparsegpt_prune(weight, hessian, 0.5, blocksize=32)
    assert (out[:, [0, 31, 32, 63]] == 0).all()
    assert torch.isfinite(out).all()
    # every input dead: nothing to learn, all zero, still no error
    out, _ = sparsegpt_prune(weight, torch.zeros(64, 64), 0.5, blocksize=32)
    assert (out == 0).all()


def test_a_hessian_that_is_not_positive_definite_is_a_clear_error():
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    indefinite = torch.eye(8)
    indefinite[0, 1] = indefinite[1, 0] = 3.0
    with pytest.raises(SparseGPTNumericalError, match="percdamp") as info:
        sparsegpt_prune(weight, indefinite, 0.5, percdamp=0.0, blocksize=4)
    assert isinstance(info.value, ValueError)
    broken = torch.eye(8)
    broken[2, 2] = float("nan")
    with pytest.raises(SparseGPTNumericalError, match="non-finite"):
        sparsegpt_prune(weight, broken, 0.5, blocksize=4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 0.6, "pattern": (2, 4)}, "means sparsity 0.5"),
        ({"sparsity": 0.5, "pattern": (2, 4), "blocksize": 6}, "multiples of 4"),
        ({"sparsity": 1.5}, r"\[0, 1\]"),
        ({"sparsity": 0.5, "column_factor": torch.ones(7)}, "column_factor"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, message):
    weight, hessian, _ = _case(31, 8, 16)
    with pytest.raises(ValueError, match=message):
        sparsegpt_prune(weight, hessian, **kwargs)


# ---------------------------------------------------------------------------------------------
# (e) the Hessian
# ---------------------------------------------------------------------------------------------


def test_hessian_one_sequence_at_a_time_and_in_batches_equals_the_direct_sum():
    d_in = 48
    xs = _inputs(37, d_in, sequences=7, tokens=30)
    expected = _hessian64(xs)
    scale = float(expected.abs().max())

    one_by_one = HessianAccumulator(d_in, torch.device("cpu"))
    for x in xs:
        one_by_one.add(x.to(torch.float32))
    batched = HessianAccumulator(d_in, torch.device("cpu"))
    batched.add(torch.stack(xs[:3]).to(torch.bfloat16).to(torch.float32))  # 3 sequences
    batched.add(torch.stack(xs[3:4]))  # a batch of 1, float64 in
    batched.add(torch.stack(xs[4:7]).to(torch.float32))
    for acc in (one_by_one, batched):
        assert acc.samples == 7
        assert acc.hessian.dtype == torch.float32 and acc.hessian.shape == (d_in, d_in)
    # float32 accumulation with rescales: a few float32 roundings of the largest entry.
    torch.testing.assert_close(
        one_by_one.hessian.to(torch.float64), expected, rtol=0, atol=1e-5 * scale
    )
    # the bfloat16 round trip of the first batch changes the inputs themselves; compare with those
    rounded = [x.to(torch.bfloat16).to(torch.float64) for x in xs[:3]] + xs[3:]
    torch.testing.assert_close(
        batched.hessian.to(torch.float64), _hessian64(rounded), rtol=0, atol=1e-5 * scale
    )


def test_hessian_rejects_mismatched_inputs_and_ignores_empty_batches():
    acc = HessianAccumulator(8, "cpu")
    with pytest.raises(ValueError, match="columns"):
        acc.add(torch.ones(3, 9))
    with pytest.raises(ValueError, match="tokens"):
        acc.add(torch.ones(8))
    acc.add(torch.ones(0, 5, 8))
    assert acc.samples == 0 and (acc.hessian == 0).all()


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["unstructured", "2of4"])
def test_cuda_equals_the_reference(pattern):
    weight, hessian, xs = _case(41, 24, 256, dead=(10,))
    acc = HessianAccumulator(256, torch.device("cuda"))
    for x in xs:
        acc.add(x.to(torch.float32).cuda())
    torch.testing.assert_close(
        acc.hessian.cpu(), hessian, rtol=0, atol=1e-5 * float(hessian.abs().max())
    )
    ref_w, ref_keep = _reference(weight, hessian, 0.5, pattern, 128)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        out, keep = sparsegpt_prune(weight.cuda(), hessian.cuda(), 0.5, pattern, 128, dtype=dtype)
        assert out.device.type == "cuda" and keep.device.type == "cuda"
        np.testing.assert_array_equal(keep.cpu().numpy(), ref_keep)
        np.testing.assert_allclose(out.cpu().numpy(), ref_w, rtol=0, atol=tol * np.abs(ref_w).max())
