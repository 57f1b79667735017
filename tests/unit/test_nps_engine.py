"""Method "nps": the published bytes recomputed from the weights by the independent float64
reference (tests/reference.py `reference_nps_model`, plain loops over ALGORITHMS.md "NPS").

How rescaled entries are compared: ALGORITHMS.md defines them as cast(float32(W) + c_b *
float32(D)) with float32 arithmetic, rounded once to the storage dtype. The reference emulates
exactly those float32 operations (each float64 result rounded to float32 at once, which is the
float32 result), so the published bits must EQUAL it, mask and values. A second check compares
them to the exact real value W + c_b * D (float64, no intermediate rounding): the only slack there
is the single rounding to storage plus the float32 rounding of c_b * D and of the sum, so the
error is at most one storage ulp of the result plus one float32 ulp of c_b * D.

Scope model is driven by calling `TensorPruner.count_model_scope` directly (the pipeline's
counting passes call it), then `run` per tensor in plan order, as the write pass does.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import reference
from worker.engine.methods import REGISTRY, MethodParams
from worker.engine.methods.nps import band_cuts, cut_count
from worker.engine.pipeline import run_prune
from worker.engine.plan import TensorTask
from worker.engine.tensor_pruner import TensorPruner
from worker.spec import JobSpec
from worker.spec.nps import NpsSpec, band_edges

SHAPES = {
    "a.weight": (37, 53),
    "b.bias": (101,),
    "c.weight": (16, 25),  # deltas from a tiny value set: ties in |D| everywhere
    "d.weight": (3, 4, 7),
}
TAGS = {torch.bfloat16: "BF16", torch.float32: "F32"}


def _tensors(dtype: torch.dtype, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base, finetuned = {}, {}
    for name, shape in SHAPES.items():
        w = torch.randn(shape, generator=g) * 0.02
        if name == "c.weight":
            values = torch.tensor([0.0, 0.25, -0.25, 0.5, -0.5])
            d = values[torch.randint(0, 5, shape, generator=g)] * 0.01
        else:
            d = torch.randn(shape, generator=g) * 0.004
            d[torch.rand(shape, generator=g) < 0.3] = 0.0
        f = w + d
        if name == "a.weight":
            # The largest update, where float32 W + 1 * D is not F (D = float32(3e-9 - 1) = -1):
            # only a select gives F there.
            w[0, 0], f[0, 0] = 1.0, 3e-9
        base[name] = w.to(dtype)
        finetuned[name] = f.to(dtype)
    return base, finetuned


def _write_pair(root: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    base, finetuned = _tensors(dtype)
    dirs = root / "base", root / "finetuned"
    for directory, tensors in zip(dirs, (base, finetuned), strict=True):
        directory.mkdir(parents=True)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return dirs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[torch.dtype, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("nps")
    return {dtype: _write_pair(root / TAGS[dtype], dtype) for dtype in TAGS}


def _weights(bands: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    weights = [rng.uniform(0.0, 2.5) for _ in range(bands)]
    weights[0] = 1.0  # a band whose factor is exactly 1 with lam 1: F is selected there
    weights[-1] = 0.0  # a band that can only be kept as the tail of the |T| order
    return weights


def _spec(pair, out: Path, method: str, sparsity: float, **nps) -> JobSpec:
    return JobSpec(
        base=str(pair[0]),
        finetuned=str(pair[1]),
        output=str(out),
        method=method,
        sparsity=sparsity,
        **({"nps": NpsSpec(**nps)} if nps else {}),
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _ulp(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The spacing of the storage dtype at |x| (float32's or bfloat16's 8-bit mantissa)."""
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7}[dtype]
    exponent = np.floor(np.log2(np.maximum(np.abs(x), 2.0**-126)))
    return 2.0 ** (exponent - mantissa_bits)


def _check_exact_value(w, f, out, kept, bands, weights, lam, dtype) -> None:
    """Rescaled entries within one rounding of the exact W + c_b * D (see the docstring)."""
    w64, o64 = (x.double().numpy().ravel() for x in (w, out))
    d = (f.float() - w.float()).double().numpy().ravel()
    c = np.array([float(np.float32(np.float32(lam) * np.float32(x))) for x in weights])
    cb = c[bands.ravel()]
    rescaled = kept.ravel() & (cb != 1.0)
    exact = w64 + cb * d
    slack = _ulp(exact, dtype) + _ulp(cb * d, torch.float32)
    assert np.all(np.abs(o64 - exact)[rescaled] <= slack[rescaled])
    assert np.array_equal(o64[~kept.ravel()], w64[~kept.ravel()])


def test_cut_counts_follow_the_float64_quotient():
    for n in (1, 2, 3, 7, 100, 101, 1000, 12345):
        for e in (0.0, 0.025, 0.1, 1 / 3, 0.4, 0.5, 0.999, 1.0):
            assert cut_count(n, e) == sum(1 for p in range(n) if p / n < e)
    edges = [0.0, 0.1, 0.4, 1.0]
    assert band_cuts(101, edges) == [0, 11, 41, 101]


@pytest.mark.parametrize("sparsity", (0.9, 0.7, 0.5))
def test_default_edges_agree_with_the_reference(sparsity):
    assert band_edges(sparsity, NpsSpec()) == reference.nps_default_edges(sparsity)


@pytest.mark.parametrize("dtype", list(TAGS), ids=list(TAGS.values()))
@pytest.mark.parametrize("lam", (1.0, 0.8))
@pytest.mark.parametrize("sparsity", (0.9, 0.7))
def test_published_bytes_equal_the_reference(pairs, tmp_path, dtype, lam, sparsity):
    pair = pairs[dtype]
    edges = reference.nps_default_edges(sparsity)
    weights = _weights(len(edges) - 1, seed=int(sparsity * 10) + int(lam * 10))
    spec = _spec(pair, tmp_path / "out", "nps", sparsity, weights=weights, lam=lam)
    result = run_prune(spec)
    published = load_file(tmp_path / "out" / "model.safetensors")
    base, finetuned = _tensors(dtype)
    records = {r["name"]: r for r in result.report["tensors"]}
    for name in SHAPES:
        w, f = base[name], finetuned[name]
        [ref_out], [kept], [bands] = reference.reference_nps_model(
            [w], [f], sparsity, weights, lam, edges
        )
        out = published[name]
        assert torch.equal(_bits(out), _bits(ref_out)), name
        # The mask itself (the published bits cannot show it where the kept update is zero), from
        # the method as the pruner drives it.
        params = MethodParams(sparsity, weights=tuple(weights), edges=tuple(edges), lam=lam)
        w32 = w.float().reshape(1, -1)
        keep, _ = REGISTRY["nps"].select(w32, f.float().reshape(1, -1) - w32, params)
        assert torch.equal(keep.reshape(w.shape), torch.from_numpy(kept)), name
        assert records[name]["kept"] == reference.keep_count(w.numel(), sparsity)
        assert records[name]["kept"] == int(kept.sum())
        _check_exact_value(w, f, out, kept, bands, weights, lam, dtype)


@pytest.mark.parametrize("dtype", list(TAGS), ids=list(TAGS.values()))
def test_all_weights_one_and_lam_one_is_magnitude(pairs, tmp_path, dtype):
    pair = pairs[dtype]
    bands = len(band_edges(0.9, NpsSpec())) - 1
    run_prune(_spec(pair, tmp_path / "nps", "nps", 0.9, weights=[1.0] * bands, lam=1.0))
    run_prune(_spec(pair, tmp_path / "mag", "magnitude", 0.9))
    nps_out = load_file(tmp_path / "nps" / "model.safetensors")
    magnitude = load_file(tmp_path / "mag" / "model.safetensors")
    for name in SHAPES:
        assert torch.equal(_bits(nps_out[name]), _bits(magnitude[name])), name


# ---------------------------------------------------------------------------------------------
# scope model, through count_model_scope
# ---------------------------------------------------------------------------------------------


def _model_scope(
    spec: JobSpec, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(outputs, keep-masks) of scope model: the counting passes, then the write pass."""
    base, finetuned = _tensors(dtype, seed=3)
    tasks = [TensorTask(name, "prune", "", shape, TAGS[dtype]) for name, shape in SHAPES.items()]
    pruner = TensorPruner(spec)
    passes = []

    def key_passes():
        passes.append(1)
        for task in tasks:
            yield pruner.order_keys(task, base[task.name], finetuned[task.name])

    pruner.global_threshold = pruner.count_model_scope(key_passes)
    outs, masks = [], []
    for task in tasks:
        w, f = base[task.name], finetuned[task.name]
        out, stats = pruner.run(task, w, f)
        outs.append(out)
        masks.append(stats.kept)
    return outs, masks, len(passes)


@pytest.mark.parametrize("dtype", list(TAGS), ids=list(TAGS.values()))
@pytest.mark.parametrize("lam", (1.0, 1.7))
def test_model_scope_equals_the_reference(tmp_path, dtype, lam):
    sparsity = 0.8
    edges = reference.nps_default_edges(sparsity)
    weights = _weights(len(edges) - 1, seed=5)
    spec = _spec(("b", "f"), tmp_path, "nps", sparsity, weights=weights, lam=lam)
    spec = spec.model_copy(update={"scope": "model", "device": "cpu"})
    outs, kept_counts, passes = _model_scope(spec, dtype)
    assert passes == 4  # two for the band cuts, two for the top k of |T|
    base, finetuned = _tensors(dtype, seed=3)
    ref_outs, ref_kept, _ = reference.reference_nps_model(
        [base[n] for n in SHAPES], [finetuned[n] for n in SHAPES], sparsity, weights, lam, edges
    )
    for name, out, ref, kept, ref_k in zip(
        SHAPES, outs, ref_outs, kept_counts, ref_kept, strict=True
    ):
        assert torch.equal(_bits(out), _bits(ref)), name
        assert kept == int(ref_k.sum()), name
    total = sum(int(np.prod(s)) for s in SHAPES.values())
    assert sum(kept_counts) == reference.keep_count(total, sparsity)
    # Scope model really is one ranking: some tensor keeps a share other than the density.
    assert any(
        k != reference.keep_count(int(np.prod(s)), sparsity)
        for k, s in zip(kept_counts, SHAPES.values(), strict=True)
    )


@pytest.mark.parametrize("dtype", list(TAGS), ids=list(TAGS.values()))
def test_model_scope_all_ones_is_magnitude(tmp_path, dtype):
    bands = len(band_edges(0.8, NpsSpec())) - 1
    nps_spec = _spec(("b", "f"), tmp_path, "nps", 0.8, weights=[1.0] * bands)
    mag_spec = _spec(("b", "f"), tmp_path, "magnitude", 0.8)
    update = {"scope": "model", "device": "cpu"}
    nps_outs, nps_kept, _ = _model_scope(nps_spec.model_copy(update=update), dtype)
    mag_outs, mag_kept, passes = _model_scope(mag_spec.model_copy(update=update), dtype)
    assert passes == 2
    assert nps_kept == mag_kept
    for a, b in zip(nps_outs, mag_outs, strict=True):
        assert torch.equal(_bits(a), _bits(b))
