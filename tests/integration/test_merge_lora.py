"""A merge whose inputs are a full fine-tune and a PEFT LoRA adapter (adapter: true), against an
independent float64 reference.

The reference reads the adapter's safetensors and config itself: the LoRA update of each targeted
weight is scale * B @ A summed rank by rank in float64 (scale = lora_alpha / r, the adapter's own
config), zero on every other tensor. Each input's task vector is pruned by tests/reference.py's
mask (its method and sparsity), and the rule's combination is computed entry by entry with plain
loops, as ALGORITHMS.md and mergekit state it. The engine composes in float32, so the output is
compared within a few float32 roundings of the terms; entries no input kept must be W's bits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.integration.test_merge_rules import make_finetunes
from tests.models import DEFAULT_LORA_TARGETS, load_state_dict, make_llama_pair, make_lora_adapter
from tests.reference import reference_mask
from worker.engine.pipeline import run_prune
from worker.spec import JobSpec

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    """A float32 base, one full fine-tune of it and a LoRA adapter on it."""
    root = tmp_path_factory.mktemp("merge_lora")
    pair = make_llama_pair(root / "pair", dtype=torch.float32, seed=31)
    [full] = make_finetunes(pair.base, root, 1)
    lora = make_lora_adapter(pair.base, root / "lora", r=4, alpha=8, seed=7)
    return pair.base, full, lora.adapter


def lora_updates(adapter: Path, base: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The adapter's update of every base tensor in float64: scale * sum_j outer(B[:, j], A[j])
    on the weights it targets, zero elsewhere."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert not config.get("use_rslora") and not config.get("fan_in_fan_out")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    updates = {name: np.zeros(tuple(w.shape)) for name, w in base.items()}
    targeted = 0
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")].double().numpy()
        a = a.double().numpy()
        rank = a.shape[0]
        scale = float(config["lora_alpha"]) / rank
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        delta = np.zeros((b.shape[0], a.shape[1]))
        for j in range(rank):  # plain math, rank by rank
            delta += np.outer(b[:, j], a[j])
        updates[name] = scale * delta
        targeted += 1
    assert targeted == 2 * len(DEFAULT_LORA_TARGETS)  # 2 layers x q, v, down
    return updates


def reference_combine(rule: str, terms: list[tuple[float, float]], lam: float, normalize: bool):
    """One entry of the merged update from (weight, pruned update) per input, plain arithmetic;
    (update, sum of the weights divided by, sum of |w_i T_i| for the error bound)."""
    if rule == "task_arithmetic":
        total = sum(w * t for w, t in terms)
        divisor = sum(w for w, _ in terms) if normalize else 1.0
        return lam * total / divisor, divisor, sum(abs(w * t) for w, t in terms)
    assert rule == "ties"
    deltas = [(w, w * t) for w, t in terms]
    positive = sum(d for _, d in deltas) >= 0
    agreeing = [(w, d) for w, d in deltas if (d > 0 if positive else d < 0)]
    divisor = sum(w for w, _ in agreeing) if normalize else 1.0
    divisor = divisor or 1.0
    return lam * sum(d for _, d in agreeing) / divisor, divisor, sum(abs(d) for _, d in deltas)


CASES = {
    # rule, lam, normalize (None: the rule's default), inputs in order
    "ties, full then adapter": (
        "ties", 0.8, None,
        [("full", 1.0, "magnitude", 0.5), ("lora", 0.6, "fapm", 0.3)],
    ),
    "task_arithmetic, adapter first": (
        "task_arithmetic", 1.2, True,
        [("lora", 0.6, "magnitude", 0.4), ("full", 1.0, "fapm", 0.6)],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_merge_with_a_lora_adapter_against_float64_reference(lora_family, case, tmp_path):
    base_dir, full_dir, adapter_dir = lora_family
    rule, lam, normalize, inputs = CASES[case]
    where = {"full": (str(full_dir), False), "lora": (str(adapter_dir), True)}
    finetuned = [
        {"model": where[kind][0], "adapter": where[kind][1], "weight": weight, "method": method,
         "sparsity": sparsity}
        for kind, weight, method, sparsity in inputs
    ]  # fmt: skip
    merge = {"rule": rule, "lam": lam, **({} if normalize is None else {"normalize": normalize})}
    out = tmp_path / "merged"
    result = run_prune(JobSpec(base=str(base_dir), finetuned=finetuned, merge=merge,
                               output=str(out)))  # fmt: skip
    assert [i["adapter"] for i in result.report["merge"]["inputs"]] == [
        kind == "lora" for kind, *_ in inputs
    ]
    normalized = rule == "ties" if normalize is None else normalize

    base = load_state_dict(base_dir)
    full = load_state_dict(full_dir)
    lora = lora_updates(adapter_dir, base)
    got = load_state_dict(out)
    assert set(got) == set(base)
    several = lora_kept = 0
    for name, w_t in base.items():
        w = w_t.double().numpy()
        pruned = []
        for kind, weight, method, sparsity in inputs:
            d = full[name].double().numpy() - w if kind == "full" else lora[name]
            kept = reference_mask(method, w, d, sparsity)
            pruned.append((weight, np.where(kept, d, 0.0)))
            lora_kept += int(kind == "lora" and (kept & (d != 0)).sum())
        mine = got[name].double().numpy()
        for index in np.ndindex(w.shape):
            terms = [(weight, float(t[index])) for weight, t in pruned]
            update, divisor, magnitude = reference_combine(rule, terms, lam, normalized)
            if all(t == 0 for _, t in terms):
                assert mine[index] == w[index], (name, index)  # W's bits: nothing kept here
                continue
            several += sum(t != 0 for _, t in terms) > 1
            # float32 differences, products and sums against float64 ones: a few roundings of
            # the terms (the adapter's float32 B @ A and the base it is added to included).
            bound = 16 * EPS32 * (abs(w[index]) + abs(lam) * (magnitude + abs(w[index])) / divisor)
            expected = w[index] + update
            assert abs(mine[index] - expected) <= bound, (name, index, mine[index], expected)
    assert several > 0 and lora_kept > 0  # both inputs kept updates, on shared entries too
