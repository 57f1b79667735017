"""A tensor above the chunking threshold (tensor_pruner.CHUNK_ABOVE_BYTES) is pruned window by
window, with its mapped pages handed back behind each pass: the output bytes and the report's
statistics are those of the whole-tensor path, for every method, scope and dtype.

The threshold and the window are set low here (one 64Ki-entry chunk per window), so a 1.1 M-entry
tensor is walked by the fused kernel in 17 windows, the last one partial, and its sample in 17
groups; the torch path (worker/engine/chunked.py: every other method, scope row and model, kernel
torch, a dtype change, scale != 1) walks any tensor above one chunk (CHUNK_BYTES / 16 = 8Ki
entries here, 4Mi by default) in chunks (whole rows for scope row), and the
statistics' windows (compose._STATS_CHUNK) are set to an odd length so they straddle chunks. The
deltas are coarsely quantised, so the k-th score has many ties that straddle windows and chunks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from worker.engine import chunked, compose, tensor_pruner
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


def _prune(
    pair, out: Path, method: str, scope: str, sparsity: float, extra: dict
) -> tuple[bytes, list]:
    nps = {"nps": NPS_WEIGHTS} if method == "nps" else {}
    spec = JobSpec(base=str(pair[0]), finetuned=str(pair[1]), output=str(out), method=method,
                   sparsity=sparsity, scope=scope, exclude="norm", **nps, **extra)  # fmt: skip
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
    monkeypatch.setattr(chunked, "MappedPages", Recorded)
    return made


def _same_as_whole(
    pair, tmp_path, monkeypatch, method, scope, sparsity, extra=None
) -> list[MappedPages]:
    extra = extra or {}
    # Statistics windows of an odd length (both runs): the chunked path's straddle its chunks.
    monkeypatch.setattr(compose, "_STATS_CHUNK", 3**11)
    whole = _prune(pair, tmp_path / "whole", method, scope, sparsity, extra)
    made = _chunked(monkeypatch)
    in_chunks = _prune(pair, tmp_path / "chunked", method, scope, sparsity, extra)
    assert in_chunks[1] == whole[1]  # every tensor's statistics
    assert in_chunks[0] == whole[0]  # the output file, byte for byte
    return made


def _fused(method: str, scope: str, extra: dict) -> bool:
    """Whether the pipeline's spec takes the fused kernel (else the torch path)."""
    return (
        method in tensor_pruner.FUSED_METHODS
        and scope == "tensor"
        and extra.get("kernel", "auto") != "torch"
        and extra.get("scale", 1.0) == 1.0
        and extra.get("dtype", "keep") == "keep"
    )


def _assert_walked(made: list[MappedPages], method: str, scope: str, extra: dict) -> None:
    """The big tensor went through the windows (fused) or chunks (torch path), over its real file
    mappings: W, F and the output's place in the shard were all released behind the passes;
    scope model's counting passes (two, nps four) walked W and F in chunks too."""
    if _fused(method, scope, extra):
        assert [p.mapped for p in made] == [3]
        return
    counting = (4 if method == "nps" else 2) if scope == "model" else 0
    assert [p.mapped for p in made] == [2] * counting + [3]


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
    _assert_walked(made, method, scope, {})


# What sends fapm and magnitude in tensor scope to the torch path too (kernel torch, a rescale, a
# float32 output), and the other methods with a rescale or a dtype change.
TORCH_CASES = [
    ("fapm", "tensor", {"kernel": "torch"}),
    ("magnitude", "tensor", {"scale": 0.75}),
    ("fapm", "row", {"dtype": "float32"}),
    ("random", "tensor", {"dtype": "float16", "scale": 1.5}),
    ("dare", "row", {"dtype": "float32"}),
    ("breadcrumbs", "tensor", {"kernel": "torch", "scale": 0.5}),
    ("nps", "tensor", {"dtype": "float32"}),
    ("magnitude", "model", {"scale": 1.25}),
]


@pytest.mark.parametrize(("method", "scope", "extra"), TORCH_CASES)
def test_torch_path_chunks_give_the_whole_tensor_bytes(
    pairs, tmp_path, monkeypatch, method, scope, extra
):
    made = _same_as_whole(pairs[torch.bfloat16], tmp_path, monkeypatch, method, scope, 0.9, extra)
    _assert_walked(made, method, scope, extra)


@pytest.mark.parametrize(
    ("dtype", "method", "sparsity"),
    [
        (torch.float16, "breadcrumbs", 0.9),
        (torch.float32, "breadcrumbs", 0.9),
        (torch.float32, "magnitude", 0.0),  # k = n and k = 0: no second counting pass
        (torch.float16, "magnitude", 1.0),
    ],
)
def test_torch_path_chunks_in_other_dtypes(pairs, tmp_path, monkeypatch, dtype, method, sparsity):
    extra = {"kernel": "torch"}
    made = _same_as_whole(pairs[dtype], tmp_path, monkeypatch, method, "tensor", sparsity, extra)
    _assert_walked(made, method, "tensor", extra)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", sorted(tensor_pruner.FUSED_METHODS))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
def test_windows_match_the_whole_tensor_in_every_dtype(
    pairs, tmp_path, monkeypatch, dtype, method, sparsity
):
    made = _same_as_whole(pairs[dtype], tmp_path, monkeypatch, method, "tensor", sparsity)
    _assert_walked(made, method, "tensor", {})


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
