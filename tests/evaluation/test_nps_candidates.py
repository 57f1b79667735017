"""NPS candidates written by the candidate builder: the weights `run_prune` publishes with
`nps.weights` (scope tensor), the independent float64 reference's (tests/reference.py, scope
tensor and model), in both of the builder's modes (bands held, or the engine's pruner per tensor
over the budget); and the band counts the report gives.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import reference
from worker.engine.pipeline import run_prune
from worker.evaluation.candidates import CandidateBuilder
from worker.spec import JobSpec
from worker.spec.nps import NpsSpec

CPU = torch.device("cpu")
LAYERS, OUT, IN = 3, 16, 24
BUDGETS = {"bands": None, "per-tensor": 0}


def _state(dtype: torch.dtype, which: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for i in range(LAYERS):
        w = torch.randn(OUT, IN, generator=g) * 0.02
        b = torch.randn(OUT, generator=g) * 0.02
        # Coarse deltas: ties in |D| inside and across tensors (scope model's tie order).
        d = torch.round(torch.randn(OUT, IN, generator=g) * 3) / 1024
        tensors[f"layers.{i}.weight"] = w + d if which == "finetuned" else w
        tensors[f"layers.{i}.bias"] = b + 0.01 if which == "finetuned" else b
    return {name: t.to(dtype) for name, t in tensors.items()}


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["BF16", "F32"])
def pair(request, tmp_path_factory) -> tuple[Path, Path, torch.dtype]:
    dtype = request.param
    root = tmp_path_factory.mktemp(f"nps_{str(dtype).split('.')[-1]}")
    for which in ("base", "finetuned"):
        (root / which).mkdir()
        save_file(_state(dtype, which), str(root / which / "model.safetensors"))
    return root / "base", root / "finetuned", dtype


def _model(dtype: torch.dtype) -> torch.nn.Module:
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Linear(IN, OUT, dtype=dtype) for _ in range(LAYERS))
    return model


def _spec(pair, out: Path, sparsity: float, scope: str = "tensor", **nps) -> JobSpec:
    bands = len(reference.nps_default_edges(sparsity)) - 1
    settings = {"weights": [1.0] * bands, **nps}
    return JobSpec(
        base=str(pair[0]),
        finetuned=str(pair[1]),
        output=str(out),
        method="nps",
        sparsity=sparsity,
        scope=scope,
        exclude="bias",  # copied tensors between the pruned ones
        device="cpu",
        nps=NpsSpec(**settings),
    )


def _weights(bands: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.0, 2.5) for _ in range(bands)]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = torch.int16 if a.element_size() == 2 else torch.int32
    return a.dtype == b.dtype and torch.equal(a.view(bits), b.view(bits))


@pytest.mark.parametrize("mode", list(BUDGETS))
def test_write_nps_equals_run_prune(pair, tmp_path, mode):
    dtype = pair[2]
    model = _model(dtype)
    builder = CandidateBuilder(_spec(pair, tmp_path / "x", 0.9), model, CPU, None, BUDGETS[mode])
    assert builder.nps_mode == ("bands-host" if mode == "bands" else "per-tensor")
    # Two candidates at one sparsity (the bands reused), then another sparsity.
    for i, (sparsity, lam) in enumerate(((0.9, 1.0), (0.9, 0.8), (0.7, 1.3))):
        bands = len(reference.nps_default_edges(sparsity)) - 1
        weights = _weights(bands, seed=i)
        builder.write_nps(sparsity, weights, lam)
        written = _params(model)
        out = tmp_path / f"out{i}"
        run_prune(_spec(pair, out, sparsity, weights=weights, lam=lam))
        published = load_file(out / "model.safetensors")
        assert set(published) == set(written)
        for name, tensor in published.items():
            assert _same_bits(written[name], tensor), (mode, sparsity, name)
    if mode == "bands":
        assert builder.memory()["held_rank_bytes"] == LAYERS * OUT * IN  # one byte an entry
    else:
        assert builder.memory()["held_rank_bytes"] == 0


@pytest.mark.parametrize("mode", list(BUDGETS))
@pytest.mark.parametrize("scope", ("tensor", "model"))
def test_candidates_and_band_counts_equal_the_reference(pair, tmp_path, mode, scope):
    dtype = pair[2]
    sparsity, lam = 0.8, 0.9
    edges = reference.nps_default_edges(sparsity)
    weights = _weights(len(edges) - 1, seed=7)
    model = _model(dtype)
    spec = _spec(pair, tmp_path, sparsity, scope)
    builder = CandidateBuilder(spec, model, CPU, None, BUDGETS[mode])
    builder.write_nps(sparsity, weights, lam)
    written = _params(model)

    base, finetuned = _state(dtype, "base"), _state(dtype, "finetuned")
    pruned = [f"layers.{i}.weight" for i in range(LAYERS)]
    groups = [pruned] if scope == "model" else [[name] for name in pruned]
    band_counts = np.zeros(len(edges) - 1, dtype=np.int64)
    kept_per_band = np.zeros(len(edges) - 1, dtype=np.int64)
    for names in groups:
        outs, kept, bands = reference.reference_nps_model(
            [base[n] for n in names], [finetuned[n] for n in names], sparsity, weights, lam, edges
        )
        for name, out, keep, band in zip(names, outs, kept, bands, strict=True):
            assert _same_bits(written[name], out), name
            band_counts += np.bincount(band.ravel(), minlength=len(edges) - 1)
            kept_per_band += np.bincount(band[keep], minlength=len(edges) - 1)
    for i in range(LAYERS):  # excluded: the fine-tuned bias
        assert _same_bits(written[f"layers.{i}.bias"], finetuned[f"layers.{i}.bias"])

    assert builder.band_counts(sparsity) == band_counts.tolist()
    if mode == "bands":
        assert builder.kept_per_band == kept_per_band.tolist()
    else:
        assert builder.kept_per_band is None  # the engine's pruner does not count them
    # The bands are not all equal: the counts can tell a wrong cut.
    assert len(set(band_counts.tolist())) > 2
