"""Scope `model`: one exact top-k over every pruned tensor, found in streaming passes, equals a
plain global stable sort of all scores (ties to the earlier tensor, then the lower index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models import load_state_dict
from tests.reference import keep_count, method_scores, rank_order, task_vector
from worker.engine.pipeline import run_prune
from worker.spec import JobSpec

BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@pytest.mark.parametrize("method", ["fapm", "magnitude", "random"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_model_scope_equals_a_global_stable_sort(bf16_pair, tmp_path, method, sparsity):
    out = tmp_path / "out"
    spec = JobSpec(base=str(bf16_pair.base), finetuned=str(bf16_pair.finetuned), output=str(out),
                   method=method, sparsity=sparsity, scope="model", exclude="norm")  # fmt: skip
    report = run_prune(spec).report
    base, ft, got = (load_state_dict(p) for p in (bf16_pair.base, bf16_pair.finetuned, out))
    pruned = [r["name"] for r in report["tensors"] if r["action"] == "prune"]  # plan order
    scores = []
    for name in pruned:
        w64 = base[name].double().numpy()
        d = task_vector(w64, ft[name].double().numpy())
        scores.append(method_scores(method, w64, d, 1.0, 0, name).ravel())
    flat = np.concatenate(scores)
    keep = np.zeros(flat.size, dtype=bool)
    keep[rank_order(flat)[: keep_count(flat.size, sparsity)]] = True
    offset = 0
    for name in pruned:
        n = ft[name].numel()
        mask = torch.from_numpy(keep[offset : offset + n]).reshape(ft[name].shape)
        offset += n
        expected = torch.where(mask, ft[name], base[name])
        assert torch.equal(got[name].view(torch.int16), expected.view(torch.int16)), name
    for name in ft:
        if "norm" in name:
            assert torch.equal(got[name], ft[name])
    assert report["totals"]["kept"] == keep_count(flat.size, sparsity)
    per_tensor = {r["kept"] / r["n"] for r in report["tensors"] if r["action"] == "prune"}
    if method != "random" and 0 < sparsity < 1:
        assert len(per_tensor) > 1  # one global threshold: densities differ between tensors


def test_model_scope_with_ties_across_tensors(tmp_path):
    """Every |D| equal: the earliest tensors in plan order get all the kept slots."""
    from safetensors.torch import save_file

    (tmp_path / "b").mkdir()
    (tmp_path / "f").mkdir()
    w = {"a": torch.zeros(10), "b": torch.zeros(10), "c": torch.zeros(10)}
    save_file(w, tmp_path / "b" / "model.safetensors")
    save_file({k: v + 1 for k, v in w.items()}, tmp_path / "f" / "model.safetensors")
    spec = JobSpec(base=str(tmp_path / "b"), finetuned=str(tmp_path / "f"),
                   output=str(tmp_path / "o"), method="magnitude", sparsity=0.5, scope="model")  # fmt: skip
    report = run_prune(spec).report
    kept = {r["name"]: r["kept"] for r in report["tensors"]}
    assert kept == {"a": 10, "b": 5, "c": 0}
    got = load_state_dict(tmp_path / "o")
    assert got["b"].tolist() == [1.0] * 5 + [0.0] * 5


def test_model_scope_refuses_methods_without_a_score():
    with pytest.raises(ValueError, match="scope"):
        JobSpec(base="b", finetuned="f", output="o", method="dare", scope="model")
