"""A tensor above the chunking threshold (tensor_pruner.CHUNK_ABOVE_BYTES) is pruned window by
window, with its mapped pages handed back behind each pass: the output bytes and the report's
statistics are those of the whole-tensor path, for every method, scope and dtype.

The threshold and the window are set low here (one 64Ki-entry chunk per window), so a 1.1 M-entry
tensor is walked in 17 windows, the last one partial, and its sample in 17 groups. The deltas are
coarsely quantised, so the k-th score has many ties that straddle windows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from worker.engine import tensor_pruner
from worker.engine.kernels import cpu_fused
from worker.engine.pipeline import run_prune
from worker.io.resident import MappedPages
from worker.spec import MODEL_SCOPE_METHODS, TASK_VECTOR_METHODS, JobSpec

pytestmark = pytest.mark.skipif(not cpu_fused.fused_available(), reason="numba is not installed")

BIG = (1000, 1100)  # 1.1 M entries: above 2 x the kernel's sample, so the sample is strided
METHODS = TASK_VECTOR_METHODS


def _write_pair(root: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    generator = torch.Generator().manual_seed(7)
    base = {
        "embed.weight": torch.randn(BIG, generator=generator) * 0.02,
        "layer.weight": torch.randn(64, 96, generator=generator) * 0.02,
        "norm.weight": torch.ones(BIG[1]),
    }
    # Deltas on a coarse grid: many entries share |D| (and so a score) at the k-th.
    finetuned = {
        name: w + torch.round(torch.randn(w.shape, generator=generator) * 3) / 512
        for name, w in base.items()
    }
    dirs = root / "base", root / "finetuned"
    for directory, tensors in zip(dirs, (base, finetuned), strict=True):
        directory.mkdir(parents=True)
        tensors = {name: t.to(dtype).contiguous() for name, t in tensors.items()}
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return dirs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[torch.dtype, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("chunked")
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    return {dtype: _write_pair(root / str(dtype).split(".")[-1], dtype) for dtype in dtypes}


# nps publishes given band weights (one per default band at sparsity 0.9), no search.
NPS_WEIGHTS = {"weights": [1.0, 2.0, 0.5, 1.5, 0.0, 2.5, 1.0, 0.7], "lam": 0.9}


def _prune(pair, out: Path, method: str, scope: str, sparsity: float) -> tuple[bytes, list]:
    nps = {"nps": NPS_WEIGHTS} if method == "nps" else {}
    spec = JobSpec(base=str(pair[0]), finetuned=str(pair[1]), output=str(out), method=method,
                   sparsity=sparsity, scope=scope, exclude="norm", **nps)  # fmt: skip
    tensors = run_prune(spec).report["tensors"]
    for record in tensors:
        record.pop("seconds")
    return (out / "model.safetensors").read_bytes(), tensors


def _chunked(monkeypatch) -> list[MappedPages]:
    """Chunk every tensor over 1 MiB in one-chunk windows; returns the page releasers made."""
    made: list[MappedPages] = []

    class Recorded(MappedPages):
        def __init__(self, *arrays) -> None:
            super().__init__(*arrays)
            made.append(self)

    monkeypatch.setattr(tensor_pruner, "CHUNK_ABOVE_BYTES", 2**20)
    monkeypatch.setattr(tensor_pruner, "CHUNK_BYTES", 2**17)
    monkeypatch.setattr(cpu_fused, "MappedPages", Recorded)
    return made


def _same_as_whole(pair, tmp_path, monkeypatch, method, scope, sparsity) -> list[MappedPages]:
    whole = _prune(pair, tmp_path / "whole", method, scope, sparsity)
    made = _chunked(monkeypatch)
    chunked = _prune(pair, tmp_path / "chunked", method, scope, sparsity)
    assert chunked[1] == whole[1]  # every tensor's statistics
    assert chunked[0] == whole[0]  # the output file, byte for byte
    return made


# Every method with every scope it accepts (scope model applies to the ranking methods only; nps
# takes tensor or model).
METHOD_SCOPES = [
    (method, scope)
    for method in METHODS
    for scope in ("tensor", "row", "model")
    if (scope != "model" or method in MODEL_SCOPE_METHODS)
    and not (method == "nps" and scope == "row")
]


@pytest.mark.parametrize(("method", "scope"), METHOD_SCOPES)
def test_every_method_and_scope_gives_the_whole_tensor_bytes(
    pairs, tmp_path, monkeypatch, method, scope
):
    made = _same_as_whole(pairs[torch.bfloat16], tmp_path, monkeypatch, method, scope, 0.9)
    if scope == "tensor" and method in tensor_pruner.FUSED_METHODS:
        # The big tensor went through the windows, over its real file mappings: W, F and the
        # output's place in the shard were all released behind the passes.
        assert [p.mapped for p in made] == [3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", sorted(tensor_pruner.FUSED_METHODS))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
def test_windows_match_the_whole_tensor_in_every_dtype(
    pairs, tmp_path, monkeypatch, dtype, method, sparsity
):
    made = _same_as_whole(pairs[dtype], tmp_path, monkeypatch, method, "tensor", sparsity)
    assert [p.mapped for p in made] == [3]


@pytest.mark.parametrize("method", sorted(tensor_pruner.FUSED_METHODS))
def test_anonymous_memory_is_never_released(method):
    """Buffers that are not file mappings (a remote read, a merged adapter) are walked in
    windows too, but never handed back: that would zero them."""
    generator = torch.Generator().manual_seed(3)
    w = (torch.randn(BIG, generator=generator) * 0.02).bfloat16()
    f = (w.float() + torch.round(torch.randn(BIG, generator=generator) * 3) / 512).bfloat16()
    k = w.numel() // 10
    whole, windowed = torch.empty_like(f), torch.empty_like(f)
    stats = cpu_fused.fused_prune(method, w, f, k, 1.0, whole)
    assert cpu_fused.fused_prune(method, w, f, k, 1.0, windowed, window=1 << 16) == stats
    assert torch.equal(windowed.view(torch.int16), whole.view(torch.int16))
    bits = (w.view(torch.int16).numpy(), f.view(torch.int16).numpy())
    assert MappedPages(*bits).mapped == 0
