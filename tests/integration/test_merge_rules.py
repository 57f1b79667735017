"""Merges of several fine-tunes of one base: against mergekit, and the NPS fusion rule against a
float64 reference.

mergekit runs here with `dtype: float32` (its deltas and sums in float32, as ours) and writes the
inputs' storage dtype, so the two compute the same expression in the same order:
- task_arithmetic (no trim): identical bits.
- ties (magnitude trim per input): identical except at mergekit's threshold ties. mergekit keeps
  k = int(density * n) by an unstable argsort, we keep floor(density * n + 0.5) with ties to the
  lower index; every tensor here has density * n integral, so the two differ only in which of the
  entries whose |D| equals the k-th largest are kept. Each differing entry is counted and checked
  to be such a tie of some input (bf16 data has many).
- dare_ties: mergekit draws its masks from torch's global generator and rescales by the L1 norm
  ratio; ours are seeded per tensor name and rescale by 1 / (1 - s) (the DARE paper). So mergekit
  is given our per-input DARE prunes (single-pair jobs) with density 1, and must give our merge's
  bits: the sign election and sum are compared on the same pruned task vectors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.models import load_state_dict, make_llama_pair
from worker.engine.pipeline import run_prune
from worker.spec import JobSpec

WEIGHTS = (1.0, 0.5, 0.8)


def make_finetunes(base_dir: Path, root: Path, count: int, fraction: float = 0.7) -> list[Path]:
    """`count` fine-tunes of the base: noise on a random `fraction` of each tensor's entries."""
    base = load_state_dict(base_dir)
    dirs = []
    for i in range(count):
        generator = torch.Generator().manual_seed(1000 + i)
        directory = root / f"ft{i}"
        shutil.copytree(base_dir, directory)
        for shard in directory.glob("*.safetensors*"):
            shard.unlink()
        tensors = {}
        for name, w in base.items():
            touched = torch.rand(w.shape, generator=generator) < fraction
            noise = 0.01 * torch.randn(w.shape, generator=generator)
            tensors[name] = (w.float() + noise * touched).to(w.dtype)
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(directory)
    return dirs


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A bf16 base and three fine-tunes of it (bf16 |D| has many exact ties)."""
    root = tmp_path_factory.mktemp("merge_family")
    pair = make_llama_pair(root / "pair", dtype=torch.bfloat16, seed=5)
    return pair.base, make_finetunes(pair.base, root, 3)


@pytest.fixture(scope="module")
def family32(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_family32")
    pair = make_llama_pair(root / "pair", dtype=torch.float32, seed=6)
    return pair.base, make_finetunes(pair.base, root, 3)


def mergekit_merge(method, base, models, parameters, out, global_parameters=None) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": p} for m, p in zip(models, parameters, strict=True)
        ],
        "parameters": global_parameters or {},
        "dtype": "float32",
        "out_dtype": {torch.bfloat16: "bfloat16", torch.float32: "float32"}[
            next(iter(load_state_dict(base).values())).dtype
        ],
    }
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config))),
        str(out),
        MergeOptions(copy_tokenizer=False, quiet=True),
    )
    return load_state_dict(out)


def ours(base, inputs, merge, out, **job) -> dict:
    result = run_prune(
        JobSpec(base=str(base), finetuned=inputs, merge=merge, output=str(out), **job)
    )
    assert result.report["merge"]["rule"] == merge["rule"]
    return load_state_dict(out)


def test_task_arithmetic_is_mergekits(family, tmp_path):
    base, fts = family
    theirs = mergekit_merge(
        "task_arithmetic",
        base,
        fts,
        [{"weight": w} for w in WEIGHTS],
        tmp_path / "mergekit",
        {"lambda": 0.7},
    )
    inputs = [
        {"model": str(m), "weight": w, "sparsity": 0.0} for m, w in zip(fts, WEIGHTS, strict=True)
    ]
    mine = ours(base, inputs, {"rule": "task_arithmetic", "lam": 0.7}, tmp_path / "ours")
    assert set(mine) == set(theirs)
    w = load_state_dict(base)
    for name in mine:
        assert mine[name].dtype == theirs[name].dtype == torch.bfloat16
        assert torch.equal(mine[name], theirs[name]), name
        assert not torch.equal(mine[name], w[name])  # the merge changed something


def _threshold_ties(d: torch.Tensor, density: float) -> torch.Tensor:
    """Entries whose |D| equals the k-th largest |D| of the tensor (k = density * n)."""
    a = d.abs().reshape(-1)
    k = int(density * a.numel())
    kth = torch.sort(a, descending=True).values[k - 1]
    return (d.abs() == kth) & (k < a.numel())


def test_ties_is_mergekits_but_threshold_ties(family, tmp_path):
    base, fts = family
    densities = (0.5, 0.25, 0.75)
    theirs = mergekit_merge(
        "ties",
        base,
        fts,
        [{"weight": w, "density": d} for w, d in zip(WEIGHTS, densities, strict=True)],
        tmp_path / "mergekit",
    )
    inputs = [
        {"model": str(m), "weight": w, "method": "magnitude", "sparsity": 1 - d}
        for m, w, d in zip(fts, WEIGHTS, densities, strict=True)
    ]
    mine = ours(base, inputs, {"rule": "ties"}, tmp_path / "ours")
    w = load_state_dict(base)
    ft = [load_state_dict(m) for m in fts]
    differing = tie_explained = compared = 0
    for name, w_t in w.items():
        assert all((d * w_t.numel()).is_integer() for d in densities), name
        diff = mine[name] != theirs[name]
        ties = torch.zeros_like(diff)
        for f, density in zip(ft, densities, strict=True):
            ties |= _threshold_ties(f[name].float() - w_t.float(), density)
        differing += int(diff.sum())
        tie_explained += int((diff & ties).sum())
        assert not (diff & ~ties).any(), f"{name}: differs where no input has a threshold tie"
        compared += diff.numel()
    assert differing == tie_explained
    assert differing < 0.01 * compared  # ties are a handful; everything else is identical
    print(f"ties: {differing} of {compared} entries differ, all at mergekit's threshold ties")


def test_dare_ties_combines_as_mergekit(family32, tmp_path):
    base, fts = family32
    sparsities = (0.5, 0.7, 0.3)
    pruned = []
    for i, (m, s) in enumerate(zip(fts, sparsities, strict=True)):
        out = tmp_path / f"dare{i}"
        run_prune(JobSpec(base=str(base), finetuned=str(m), output=str(out), method="dare",
                          sparsity=s, seed=11))  # fmt: skip
        pruned.append(out)
    theirs = mergekit_merge(
        "dare_ties",
        base,
        pruned,
        [{"weight": w, "density": 1.0} for w in WEIGHTS],
        tmp_path / "mergekit",
    )
    inputs = [
        {"model": str(m), "weight": w, "method": "dare", "sparsity": s}
        for m, w, s in zip(fts, WEIGHTS, sparsities, strict=True)
    ]
    mine = ours(base, inputs, {"rule": "ties", "normalize": False}, tmp_path / "ours", seed=11)
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def _magnitude_update64(w: torch.Tensor, f: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The magnitude-pruned task vector in float64 (ALGORITHMS.md: D = F - W in float32, k =
    floor(density * n + 0.5) largest |D| kept, ties to the lower index), by a stable sort."""
    d = (f.float() - w.float()).reshape(-1).to(torch.float64)
    k = int((1 - sparsity) * d.numel() + 0.5)
    order = torch.sort(-d.abs(), stable=True).indices
    kept = torch.zeros_like(d)
    kept[order[:k]] = d[order[:k]]
    return kept.reshape(w.shape)


def test_nps_fusion_against_float64_reference(family32, tmp_path):
    base, fts = family32
    sparsities, lam = (0.5, 0.8, 0.2), 1.3
    inputs = [
        {"model": str(m), "weight": w, "method": "magnitude", "sparsity": s}
        for m, w, s in zip(fts, WEIGHTS, sparsities, strict=True)
    ]
    mine = ours(base, inputs, {"rule": "nps_fusion", "lam": lam}, tmp_path / "ours")
    w = load_state_dict(base)
    ft = [load_state_dict(m) for m in fts]
    several = 0
    for name, w_t in w.items():
        total = torch.zeros(w_t.shape, dtype=torch.float64)
        magnitude = torch.zeros(w_t.shape, dtype=torch.float64)
        count = torch.zeros(w_t.shape, dtype=torch.float64)
        for f, weight, s in zip(ft, WEIGHTS, sparsities, strict=True):
            t = _magnitude_update64(w_t, f[name], s)
            total += lam * weight * t
            magnitude += (lam * weight * t).abs()
            count += t != 0
        w64 = w_t.to(torch.float64)
        expected = (w64 + total / count.clamp(min=1)).to(torch.float32)
        # float32 products and sums against float64 ones: a few roundings of the terms apart.
        bound = 4 * torch.finfo(torch.float32).eps * (w64.abs() + magnitude)
        assert ((mine[name].double() - expected.double()).abs() <= bound).all(), name
        untouched = count == 0  # no input kept an update here: the base's bits
        assert torch.equal(mine[name][untouched], w_t[untouched]), name
        several += int((count > 1).sum())
    assert several > 0  # entries where the disjoint mean divides by more than one


def test_one_input_task_arithmetic_is_the_single_pair_prune(family, tmp_path):
    """A merge of one input at weight 1 is that input's prune (same pruner, rounded once)."""
    base, fts = family
    single = tmp_path / "single"
    run_prune(JobSpec(base=str(base), finetuned=str(fts[0]), output=str(single),
                      method="fapm", sparsity=0.8))  # fmt: skip
    merged = ours(
        base,
        [{"model": str(fts[0]), "method": "fapm", "sparsity": 0.8}],
        {"rule": "task_arithmetic"},
        tmp_path / "merged",
    )
    expected = load_state_dict(single)
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name
