"""The engine's methods, selection and output composition agree bit for bit with tests/reference.py.

The reference is an independent float64 rendering of ALGORITHMS.md; the engine is driven exactly
as the stream loop drives it: `method.mask` on float32 (rows, cols) views, then `compose_output`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import reference
from tests.reference import reference_prune
from worker.engine.compose import compose_output, delta_stats
from worker.engine.methods import REGISTRY, MethodParams
from worker.engine.methods.base import uniform_draws
from worker.engine.select import order_keys, rank_window_mask, top_k_mask
from worker.spec import METHOD_NAMES, TASK_VECTOR_METHODS

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SPARSITIES = (0.0, 0.1, 0.5, 0.9, 0.99, 1.0)
SHAPES = ((37, 53), (101,))
NAME = "model.layers.0.mlp.up_proj.weight"
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def engine_prune(
    method: str,
    w: torch.Tensor,
    f: torch.Tensor,
    sparsity: float,
    alpha: float = 1.0,
    gamma: float = 0.01,
    scale: float = 1.0,
    seed: int = 0,
    tensor_name: str = NAME,
    scope: str = "tensor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one tensor through the engine's method and compose_output, as the stream loop does."""
    impl = REGISTRY[method]
    w32 = w.to(torch.float32)
    d32 = f.to(torch.float32) - w32
    view = (w.shape[0], -1) if scope == "row" and w.dim() >= 2 else (1, -1)
    # nps folds scale into lam (its per-entry factors); the other methods ignore lam.
    params = MethodParams(
        sparsity=sparsity, alpha=alpha, gamma=gamma, seed=seed, tensor_name=tensor_name, lam=scale
    )
    keep, factors = impl.select(w32.reshape(view), d32.reshape(view), params)
    keep = keep.reshape(w.shape)
    factor = impl.update_factor(params) * scale if factors is None else factors.reshape(w.shape)
    return compose_output(w, f, keep, factor, f.dtype), keep


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal stored bytes; a NaN only has to be a NaN (implementations differ in NaN payloads)."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    a = actual.contiguous().view(_BITS[actual.dtype])
    e = expected.contiguous().view(_BITS[expected.dtype])
    both_nan = torch.isnan(actual.float()) & torch.isnan(expected.float())
    bad = ((a != e) & ~both_nan).flatten().nonzero().flatten()
    if bad.numel():
        i = bad[:5].tolist()
        flat_a, flat_e = actual.flatten(), expected.flatten()
        pytest.fail(
            f"{bad.numel()} of {actual.numel()} entries differ; first at {i}: "
            f"engine {flat_a[i].tolist()} vs reference {flat_e[i].tolist()}"
        )


def make_pair(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """W with some exact zeros, and F = W + noise on about 60% of entries (so D has zeros)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[torch.rand(shape, generator=g) < 0.05] = 0.0
    noise = torch.randn(shape, generator=g) * 0.004
    # A few updates far larger than their weight, so fapm's scores are of both signs.
    noise[torch.rand(shape, generator=g) < 0.05] *= 20.0
    touched = torch.rand(shape, generator=g) < 0.6
    f = torch.where(touched, w + noise, w)
    return w.to(dtype), f.to(dtype)


def check_against_reference(method, w, f, sparsity, **kwargs) -> torch.Tensor:
    out, keep = engine_prune(method, w, f, sparsity, **kwargs)
    ref_out, ref_keep = reference_prune(method, w, f, sparsity, **{"tensor_name": NAME, **kwargs})
    assert torch.equal(keep, ref_keep), f"masks differ at {(keep != ref_keep).nonzero()[:5]}"
    assert_same_bits(out, ref_out)
    return keep


def _cases():
    for dtype in DTYPES:
        for shape in SHAPES:
            for sparsity in SPARSITIES:
                for method in reference.ALL_METHODS:
                    scopes = (
                        ("tensor", "row") if method in reference.SCORED_METHODS else ("tensor",)
                    )
                    for scope in scopes:
                        yield pytest.param(
                            method,
                            dtype,
                            shape,
                            sparsity,
                            scope,
                            id=f"{method}-{_dtype_id(dtype)}-{'x'.join(map(str, shape))}"
                            f"-s{sparsity}-{scope}",
                        )


# ---------------------------------------------------------------------------------------------
# the registry and the reference itself
# ---------------------------------------------------------------------------------------------


def test_registry_names_equal_spec_method_names():
    # The task-vector engine's registry; wanda and sparsegpt belong to the weights engine.
    assert set(REGISTRY) == set(TASK_VECTOR_METHODS)
    assert len(METHOD_NAMES) == len(set(METHOD_NAMES))
    assert set(reference.ALL_METHODS) == set(TASK_VECTOR_METHODS)


def test_reference_on_a_hand_computed_example():
    # W = [1, -2, 0.5, 4, 0, 1], D = [0.5, -0.5, 0.25, 0, 1, -0.5]; n = 6, s = 0.5 -> k = 3.
    w = torch.tensor([1.0, -2.0, 0.5, 4.0, 0.0, 1.0])
    d = torch.tensor([0.5, -0.5, 0.25, 0.0, 1.0, -0.5])
    f = w + d
    assert reference.keep_count(6, 0.5) == 3
    assert reference.keep_count(6, 0.9) == 1  # floor(0.6 + 0.5)
    assert reference.keep_count(101, 0.5) == 51  # floor(50.5 + 0.5)

    def kept(method, sparsity=0.5, **kwargs):
        _, mask = reference_prune(method, w, f, sparsity, **kwargs)
        return mask.flatten().nonzero().flatten().tolist()

    # magnitude: |D| = [.5, .5, .25, 0, 1, .5]: idx 4 first, then the .5-tie by index: 0, 1, (5).
    assert kept("magnitude") == [0, 1, 4]
    # s = 0.9 keeps k = 1: the largest, idx 4.
    assert kept("magnitude", 0.9) == [4]
    # fapm: c = mean|W| = 8.5 / 6 = 1.41667.
    #   idx 0: .5 - .5 * c / 1   = -0.2083      idx 1: .5 - .5 * c / 2 = 0.1458
    #   idx 2: .25 - .25 * c / .5 = -0.4583     idx 3: D == 0 -> S = 0
    #   idx 4: 1 - c / 1e-12 = -1.4e12          idx 5: -0.2083 (ties idx 0)
    # order: 1, 3, 0, 5, 2, 4 -> keep {1, 3, 0}.
    assert kept("fapm") == [0, 1, 3]
    # alpha = 0: c = 0, the score is |D| -> same as magnitude.
    assert kept("fapm", alpha=0.0) == [0, 1, 4]
    # breadcrumbs, gamma = 0.2: g = floor(1.2 + 0.5) = 1 outlier (idx 4) skipped; ranks 1..3 of
    # the |D| order 4, 0, 1, 5, 2, 3 are 0, 1, 5.
    assert kept("breadcrumbs", gamma=0.2) == [0, 1, 5]
    # gamma so large that g + k > n: g = min(6, 6 - 3) = 3, ranks 3..5 are 5, 2, 3.
    assert kept("breadcrumbs", gamma=1.0) == [2, 3, 5]

    # Row scope on a (2, 3) view: k = floor(1.5 + 0.5) = 2 per row.
    w2, f2 = w.reshape(2, 3), f.reshape(2, 3)
    _, m = reference_prune("magnitude", w2, f2, 0.5, scope="row")
    # row 0: |D| .5, .5, .25 -> 0, 1; row 1: |D| 0, 1, .5 -> local 1, 2 (flat 4, 5).
    assert m.flatten().nonzero().flatten().tolist() == [0, 1, 4, 5]
    _, m = reference_prune("fapm", w2, f2, 0.5, scope="row")
    # c is still the whole-tensor mean: row 0 scores -.208, .146, -.458 -> 1, 0;
    # row 1 scores 0, -1.4e12, -.208 -> local 0, 2 (flat 3, 5).
    assert m.flatten().nonzero().flatten().tolist() == [0, 1, 3, 5]

    # Output of a select: F where kept, W elsewhere.
    out, _ = reference_prune("fapm", w, f, 0.5)
    assert out.tolist() == [1.5, -2.5, 0.5, 4.0, 0.0, 1.0]
    # dare at s = 0.5 rescales kept updates by 2: O = W + 2 D where kept.
    out, m = reference_prune("dare", w, f, 0.5)
    expected = torch.where(m, w + 2 * d, w)
    assert out.tolist() == expected.tolist()
    # scale 3 on a select method: O = W + 3 D where kept.
    out, m = reference_prune("magnitude", w, f, 0.5, scale=3.0)
    assert out.tolist() == [2.5, -3.5, 0.5, 4.0, 3.0, 1.0]


def test_reference_order_rules():
    s = np.array([0.5, np.nan, -np.inf, -0.0, 0.0, 0.5, np.inf, -1.0, np.nan])
    # inf, then the .5-tie by index (0, 5), then the zeros (-0.0 == +0.0, by index 3, 4), -1,
    # -inf, and the NaNs last (by index).
    assert reference.rank_order(s).tolist() == [6, 0, 5, 3, 4, 7, 2, 1, 8]


def test_reference_random_draws_are_seeded_by_seed_and_name():
    a = reference.uniform_draws(0, "x", 10)
    assert np.array_equal(a, reference.uniform_draws(0, "x", 10))
    assert not np.array_equal(a, reference.uniform_draws(1, "x", 10))
    assert not np.array_equal(a, reference.uniform_draws(0, "y", 10))


# ---------------------------------------------------------------------------------------------
# engine vs. reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "dtype", "shape", "sparsity", "scope"), list(_cases()))
def test_engine_matches_reference(method, dtype, shape, sparsity, scope):
    w, f = make_pair(shape, dtype, seed=len(shape) * 7 + DTYPES.index(dtype))
    keep = check_against_reference(method, w, f, sparsity, scope=scope)
    if method != "dare":
        n_row = shape[-1] if scope == "row" and len(shape) >= 2 else w.numel()
        rows = w.numel() // n_row
        assert int(keep.sum()) == rows * reference.keep_count(n_row, sparsity)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("method", reference.ALL_METHODS)
def test_sparsity_zero_gives_f_and_one_gives_w_bit_for_bit(method, dtype):
    w, f = make_pair((37, 53), dtype, seed=3)
    out0, _ = engine_prune(method, w, f, 0.0)
    assert_same_bits(out0, f)
    out1, _ = engine_prune(method, w, f, 1.0)
    assert_same_bits(out1, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("method", ("fapm", "magnitude", "breadcrumbs", "random", "dare"))
@pytest.mark.parametrize("scale", (0.5, 2.0, -1.0))
@pytest.mark.parametrize("sparsity", (0.0, 0.5, 0.9))
def test_scale_rescales_kept_updates_as_the_reference(method, dtype, scale, sparsity):
    w, f = make_pair((37, 53), dtype, seed=5)
    check_against_reference(method, w, f, sparsity, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("method", ("fapm", "magnitude", "random"))
@pytest.mark.parametrize("alpha", (1.0, 0.37, 3.0))
def test_scores_are_the_reference_float32_scores_bit_for_bit(method, dtype, alpha):
    # Masks only see a score's rank; compare the float32 scores themselves so a last-bit
    # difference (an op done in float64, c not rounded to float32) cannot hide.
    impl = REGISTRY[method]
    for seed in range(4):
        w, f = make_pair((37, 53), dtype, seed=41 + seed)
        w32 = w.float()
        d32 = f.float() - w32
        params = MethodParams(sparsity=0.5, alpha=alpha, tensor_name=NAME)
        got = impl.scores(w32.reshape(1, -1), d32.reshape(1, -1), params).reshape(w.shape)
        ref = reference.method_scores(
            method, w.double().numpy(), d32.double().numpy(), alpha, 0, NAME
        )
        assert_same_bits(got, torch.from_numpy(ref).float())


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("alpha", (0.0, 0.5, 2.0, 10.0))
@pytest.mark.parametrize("scope", ("tensor", "row"))
def test_fapm_alpha(dtype, alpha, scope):
    w, f = make_pair((37, 53), dtype, seed=11)
    check_against_reference("fapm", w, f, 0.7, alpha=alpha, scope=scope)


@pytest.mark.parametrize("gamma", (0.0, 0.01, 0.1, 0.5, 1.0))
@pytest.mark.parametrize("sparsity", (0.0, 0.3, 0.9))
@pytest.mark.parametrize("scope", ("tensor", "row"))
def test_breadcrumbs_gamma(gamma, sparsity, scope):
    w, f = make_pair((37, 53), torch.bfloat16, seed=13)
    check_against_reference("breadcrumbs", w, f, sparsity, gamma=gamma, scope=scope)


@pytest.mark.parametrize("method", reference.ALL_METHODS)
@pytest.mark.parametrize("seed", (0, 1, 12345))
def test_seeds_and_tensor_names(method, seed):
    w, f = make_pair((20, 30), torch.float32, seed=17)
    for name in ("", "lm_head.weight", "model.embed_tokens.weight"):
        check_against_reference(method, w, f, 0.6, seed=seed, tensor_name=name)


@pytest.mark.parametrize("method", reference.SCORED_METHODS)
def test_row_scope_on_a_3d_tensor_uses_first_dim_rows(method):
    w, f = make_pair((4, 5, 6), torch.bfloat16, seed=19)
    keep = check_against_reference(method, w, f, 0.5, scope="row")
    assert keep.reshape(4, -1).sum(dim=1).tolist() == [15] * 4


# ---------------------------------------------------------------------------------------------
# ties, zeros, non-finite values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("method", ("fapm", "magnitude", "breadcrumbs"))
@pytest.mark.parametrize("scope", ("tensor", "row"))
def test_all_equal_scores_keep_the_lowest_indices(method, dtype, scope):
    # |W| = 0.5 and |D| = 0.25 everywhere: every score is equal, so the first k indices are kept
    # (breadcrumbs: after the first g).
    g = torch.Generator().manual_seed(23)
    sign_w = torch.randint(0, 2, (12, 10), generator=g) * 2 - 1
    sign_d = torch.randint(0, 2, (12, 10), generator=g) * 2 - 1
    w = (0.5 * sign_w).to(dtype)
    f = (0.5 * sign_w + 0.25 * sign_d).to(dtype)
    sparsity, gamma = 0.75, 0.1
    keep = check_against_reference(method, w, f, sparsity, gamma=gamma, scope=scope)
    rows = keep.reshape(12, 10) if scope == "row" else keep.reshape(1, 120)
    n = rows.shape[1]
    k = reference.keep_count(n, sparsity)
    skip = reference.outlier_count(n, k, gamma) if method == "breadcrumbs" else 0
    expected = torch.zeros_like(rows)
    expected[:, skip : skip + k] = True
    assert torch.equal(rows, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("method", reference.SCORED_METHODS)
@pytest.mark.parametrize("sparsity", (0.1, 0.5, 0.8, 0.95))
@pytest.mark.parametrize("scope", ("tensor", "row"))
def test_many_ties_from_a_tiny_value_set(method, dtype, sparsity, scope):
    # W from {0, +-0.5, +-1} (equal magnitudes, and zeros), D from {0, +-0.25, +-0.5}: few
    # distinct scores, so nearly every threshold falls inside a tie class.
    g = torch.Generator().manual_seed(29)
    w_vals = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0])
    d_vals = torch.tensor([0.0, 0.25, -0.25, 0.5, -0.5])
    w32 = w_vals[torch.randint(0, 5, (16, 25), generator=g)]
    d32 = d_vals[torch.randint(0, 5, (16, 25), generator=g)]
    w, f = w32.to(dtype), (w32 + d32).to(dtype)
    check_against_reference(method, w, f, sparsity, gamma=0.05, scope=scope)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_fapm_zero_weight_ranks_its_update_last_and_zero_update_scores_zero(dtype):
    # W == 0 with D != 0 gets a hugely negative score; D == 0 scores exactly 0, above it.
    w = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.5, 0.5]).to(dtype)
    f = torch.tensor([0.25, 0.5, 0.0, 0.75, 1.5, 0.5]).to(dtype)
    keep = check_against_reference("fapm", w, f, 0.5)
    # c = float32(2 / 6) = 0.3333; idx 3: .25 - .25 * c / .5 = 0.0833; idx 4: 1 - c / .5 = 0.333
    # idx 1, 2, 5: D == 0 -> 0; idx 0: -huge. k = 3 -> 4, 3, then the 0-tie's lowest index 1.
    assert keep.nonzero().flatten().tolist() == [1, 3, 4]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("method", reference.ALL_METHODS)
@pytest.mark.parametrize("sparsity", (0.0, 0.5, 0.9, 1.0))
@pytest.mark.parametrize("scale", (1.0, 2.0))
def test_nan_and_inf_in_f_are_pruned_like_any_value(method, dtype, sparsity, scale):
    w, f = make_pair((37, 53), dtype, seed=31)
    f = f.clone()
    f[0, 0] = float("nan")
    f[1, 5] = float("inf")
    f[2, 7] = float("-inf")
    w = w.clone()
    w[3, 3] = 0.0
    f[3, 3] = float("inf")  # inf update on a zero weight
    keep = check_against_reference(method, w, f, sparsity, scale=scale)
    w32, f32 = w.float(), f.float()
    stats = delta_stats(w32, f32, f32 - w32, keep)
    assert stats.nonfinite == 4
    assert stats.n == w.numel()


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("scope", ("tensor", "row"))
def test_fapm_with_an_infinite_weight_scores_zero_updates_zero(dtype, scope):
    # An inf in W makes c = inf, so c * a is NaN where a == 0: the D == 0 rule must give 0 there,
    # and the finite updates (score -inf) rank below the zero updates.
    w, f = make_pair((37, 53), dtype, seed=43)
    w, f = w.clone(), f.clone()
    w[0, 1] = float("inf")
    f[0, 1] = float("inf")  # D = inf - inf = NaN
    keep = check_against_reference("fapm", w, f, 0.6, scope=scope)
    w32 = w.float()
    d32 = f.float() - w32
    scores = REGISTRY["fapm"].scores(w32, d32, MethodParams(sparsity=0.6))
    assert torch.all(scores[d32 == 0] == 0)
    assert not torch.isnan(scores[d32 == 0]).any()
    if scope == "tensor":
        zero_updates = int((d32 == 0).sum())
        k = reference.keep_count(w.numel(), 0.6)
        assert int((keep & (d32 == 0)).sum()) == min(k, zero_updates)


def test_random_draws_beyond_one_chunk_match_one_large_draw():
    # The engine draws in chunks of 2**20; the stream must equal a single draw.
    n = (1 << 20) + 77
    got = uniform_draws(MethodParams(sparsity=0.5, seed=7, tensor_name=NAME), n)
    assert np.array_equal(got, reference.uniform_draws(7, NAME, n))


# ---------------------------------------------------------------------------------------------
# the selection primitives on adversarial scores
# ---------------------------------------------------------------------------------------------


def _adversarial_scores() -> torch.Tensor:
    tiny = float(np.float32(1e-45))  # smallest positive subnormal
    values = [
        0.0, -0.0, float("nan"), float("inf"), float("-inf"), tiny, -tiny,
        1.0, -1.0, 1.0, -0.0, float("nan"), 3.4e38, -3.4e38, 1e-38, -1e-38, 0.0, 2.0, -2.0, 1.0,
    ]  # fmt: skip
    g = torch.Generator().manual_seed(37)
    perm = torch.randperm(len(values), generator=g)
    return torch.tensor(values, dtype=torch.float32)[perm]


@pytest.mark.parametrize("skip", (0, 1, 3))
def test_select_primitives_order_as_the_reference(skip):
    scores = _adversarial_scores()
    n = scores.numel()
    s64 = scores.double().numpy()
    for k in range(0, n - skip + 1):
        ref = torch.from_numpy(reference.top_k(s64, k, skip))
        keys = order_keys(scores).reshape(1, -1)
        if skip == 0:
            got = top_k_mask(keys, k).flatten()
        else:
            got = rank_window_mask(keys, skip, k).flatten()
        assert torch.equal(got, ref), f"k={k} skip={skip}"
