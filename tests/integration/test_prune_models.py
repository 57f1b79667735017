"""The engine end to end on tiny real Llama checkpoints, checked against the float64 reference.

Most cases call `run_prune` in-process (the same function the CLI calls); the CLI itself runs as a
subprocess where the user-facing behaviour is the point (sharding, loading with transformers).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models import load_state_dict, lora_merged_state_dict, make_llama_pair
from tests.reference import reference_prune
from worker.engine.pipeline import run_prune
from worker.spec import JobSpec

REPO = Path(__file__).resolve().parents[2]
METHODS = ["fapm", "magnitude", "random", "dare", "breadcrumbs"]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _prune(pair, out: Path, **kw) -> dict:
    spec = JobSpec(base=str(pair.base), finetuned=str(pair.finetuned), output=str(out), **kw)
    return run_prune(spec).report


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))
    )


def _assert_matches_reference(pair, out: Path, method: str, sparsity: float, **kw) -> None:
    base, ft, got = (
        load_state_dict(pair.base),
        load_state_dict(pair.finetuned),
        load_state_dict(out),
    )
    assert set(got) == set(ft)
    for name, f in ft.items():
        expected, _ = reference_prune(method, base[name], f, sparsity, tensor_name=name, **kw)
        assert _same_bytes(got[name], expected), f"{name}: output differs from the reference"


@pytest.mark.parametrize("pair_name", ["bf16_pair", "fp16_pair", "fp32_pair"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_equals_the_float64_reference(request, tmp_path, pair_name, method):
    pair = request.getfixturevalue(pair_name)
    for sparsity in (0.0, 0.3, 0.9, 1.0):
        out = tmp_path / f"s{sparsity}"
        report = _prune(pair, out, method=method, sparsity=sparsity, seed=3)
        _assert_matches_reference(pair, out, method, sparsity, seed=3)
        if method != "dare":
            assert report["totals"]["density"] == pytest.approx(1 - sparsity, abs=0.01)


@pytest.mark.parametrize("kernel", ["torch", "auto"])
@pytest.mark.parametrize("method", ["fapm", "magnitude"])
def test_both_kernels_give_the_reference_bytes(bf16_pair, tmp_path, kernel, method):
    report = _prune(bf16_pair, tmp_path / "out", method=method, sparsity=0.9, kernel=kernel)
    _assert_matches_reference(bf16_pair, tmp_path / "out", method, 0.9)
    if kernel == "torch":
        assert report["implementation"] == "torch-cpu"


def test_sparsity_0_is_finetuned_and_1_is_base_bit_for_bit(fp16_pair, tmp_path):
    base, ft = load_state_dict(fp16_pair.base), load_state_dict(fp16_pair.finetuned)
    _prune(fp16_pair, tmp_path / "s0", sparsity=0.0)
    _prune(fp16_pair, tmp_path / "s1", sparsity=1.0)
    s0, s1 = load_state_dict(tmp_path / "s0"), load_state_dict(tmp_path / "s1")
    assert all(_same_bytes(s0[n], ft[n]) for n in ft)
    assert all(_same_bytes(s1[n], base[n]) for n in ft)


def test_row_scope_equals_the_reference(fp32_pair, tmp_path):
    for method in ("fapm", "magnitude", "breadcrumbs", "random"):
        out = tmp_path / method
        _prune(fp32_pair, out, method=method, sparsity=0.7, scope="row")
        _assert_matches_reference(fp32_pair, out, method, 0.7, scope="row")


def test_exclude_keeps_the_whole_update_of_matching_tensors(bf16_pair, tmp_path):
    report = _prune(bf16_pair, tmp_path / "out", sparsity=0.9, exclude="embed|norm")
    ft, got = load_state_dict(bf16_pair.finetuned), load_state_dict(tmp_path / "out")
    records = {r["name"]: r for r in report["tensors"]}
    excluded = [n for n in ft if "embed" in n or "norm" in n]
    assert excluded
    for name in excluded:
        assert _same_bytes(got[name], ft[name])
        assert records[name]["action"] == "copy" and records[name]["reason"] == "excluded"
    assert records["model.layers.0.mlp.up_proj.weight"]["action"] == "prune"


def test_sharded_input_and_output_load_and_run_with_transformers(sharded_pair, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "prune", "--base", str(sharded_pair.base),
         "--finetuned", str(sharded_pair.finetuned), "--out", str(out), "--sparsity", "0.9",
         "--shard-size", "10KB"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3
    assert shards == sorted(set(index["weight_map"].values()))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:  # every shard holds at most 10 KB of data, unless one tensor is bigger
        sizes = [t.numel() * t.element_size() for t in load_state_dict_file(out / shard).values()]
        assert sum(sizes) <= 10_000 or len(sizes) == 1
    _assert_matches_reference(sharded_pair, out, "fapm", 0.9)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).read_bytes() == (sharded_pair.finetuned / name).read_bytes()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_report_and_model_card(bf16_pair, tmp_path):
    out = tmp_path / "out"
    report = _prune(bf16_pair, out, method="fapm", sparsity=0.8, alpha=0.5)
    on_disk = json.loads((out / "pruning_report.json").read_text())
    assert on_disk["totals"] == report["totals"]
    assert on_disk["spec"]["alpha"] == 0.5 and on_disk["spec"]["method"] == "fapm"
    for side in ("base", "finetuned"):
        shards = on_disk["inputs"][side]["shards"]
        directory = getattr(bf16_pair, side)
        assert shards == {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.glob("*.safetensors"))
        }
    ft = load_state_dict(bf16_pair.finetuned)
    base = load_state_dict(bf16_pair.base)
    kept_total = 0
    for record in on_disk["tensors"]:
        name = record["name"]
        _, mask = reference_prune("fapm", base[name], ft[name], 0.8, alpha=0.5)
        d = ft[name].double() - base[name].double()
        assert record["n"] == ft[name].numel()
        assert record["kept"] == int(mask.sum())
        assert record["nonzero_delta"] == int((d != 0).sum())
        assert record["kept_nonzero"] == int(((d != 0) & mask).sum())
        assert record["w_zero"] == int((base[name] == 0).sum())
        l1 = d.abs().sum().item()
        assert record["l1_kept_ratio"] == pytest.approx(
            d.abs()[mask].sum().item() / l1 if l1 else 1.0, rel=1e-5
        )
        kept_total += record["kept"]
    assert on_disk["totals"]["kept"] == kept_total
    written = {s["file"]: s["sha256"] for s in on_disk["output"]["shards"]}
    assert written == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.safetensors")
    }
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert f'base_model: "{bf16_pair.base}"' in front
    assert "library_name: transformers" in front and "- fapm" in front
    assert "arxiv.org/abs/2509.08255" in card and '"alpha": 0.5' in card


def test_tied_embeddings(tied_pair, tmp_path):
    _prune(tied_pair, tmp_path / "out", sparsity=0.5)
    got = load_state_dict(tmp_path / "out")
    assert "lm_head.weight" not in got
    _assert_matches_reference(tied_pair, tmp_path / "out", "fapm", 0.5)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_added_vocabulary_rows_are_kept(added_vocab_pair, tmp_path):
    pair = added_vocab_pair
    report = _prune(pair, tmp_path / "out", method="magnitude", sparsity=0.75)
    base, ft = load_state_dict(pair.base), load_state_dict(pair.finetuned)
    got = load_state_dict(tmp_path / "out")
    records = {r["name"]: r for r in report["tensors"]}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = base[name].shape[0]
        assert ft[name].shape[0] == rows + pair.extra_vocab
        expected, _ = reference_prune("magnitude", base[name], ft[name][:rows], 0.75)
        assert _same_bytes(got[name][:rows], expected)
        assert _same_bytes(got[name][rows:], ft[name][rows:])
        assert records[name]["action"] == "prune_rows" and records[name]["shared_rows"] == rows
        assert records[name]["n"] == base[name].numel()


def test_dtype_conversion(bf16_pair, tmp_path):
    _prune(bf16_pair, tmp_path / "out", sparsity=0.0, dtype="float32")
    ft, got = load_state_dict(bf16_pair.finetuned), load_state_dict(tmp_path / "out")
    for name, tensor in ft.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor.float())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "float32"


def test_lora_adapter_equals_pruning_peft_merge_and_unload(lora_fp32, tmp_path):
    """Pruning base + adapter equals pruning peft's merged model.

    float32 weights: our F = float32(W + scale * (B @ A)) and peft's merge adds the same
    float32 delta to the float32 weight, so the merged weights agree exactly here; in bf16/fp16
    peft first rounds the delta to the weight dtype, so they could differ by float rounding.
    """
    merged = lora_merged_state_dict(lora_fp32.base, lora_fp32.adapter)
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    from safetensors.torch import save_file

    base = load_state_dict(lora_fp32.base)
    save_file({k: v.contiguous() for k, v in merged.items() if k in base},
              merged_dir / "model.safetensors")  # fmt: skip
    for sparsity in (0.0, 0.5, 0.9):
        via_adapter = tmp_path / f"adapter-{sparsity}"
        via_merge = tmp_path / f"merge-{sparsity}"
        run_prune(JobSpec(base=str(lora_fp32.base), adapter=str(lora_fp32.adapter),
                          output=str(via_adapter), sparsity=sparsity))  # fmt: skip
        run_prune(JobSpec(base=str(lora_fp32.base), finetuned=str(merged_dir),
                          output=str(via_merge), sparsity=sparsity))  # fmt: skip
        a, b = load_state_dict(via_adapter), load_state_dict(via_merge)
        assert set(a) == set(b)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # Untargeted tensors have D = 0 and come out equal to the base.
    out = load_state_dict(tmp_path / "adapter-0.0")
    assert torch.equal(
        out["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
    )
    assert not torch.equal(
        out["model.layers.0.self_attn.q_proj.weight"],
        base["model.layers.0.self_attn.q_proj.weight"],
    )
    # The output gets the base's config (an adapter has none of its own).
    assert (tmp_path / "adapter-0.0" / "config.json").read_bytes() == (
        lora_fp32.base / "config.json"
    ).read_bytes()


def test_use_dora_without_magnitudes_is_refused(lora_fp32, tmp_path):
    """DoRA is read (tests/integration/test_dora_adapters.py); an adapter that says DoRA but has
    no magnitude vectors is not one, and nothing is published."""
    import shutil

    adapter = tmp_path / "dora"
    shutil.copytree(lora_fp32.adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["use_dora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    from worker.errors import CorruptCheckpoint

    with pytest.raises(CorruptCheckpoint, match="lora_magnitude_vector"):
        run_prune(
            JobSpec(base=str(lora_fp32.base), adapter=str(adapter), output=str(tmp_path / "o"))
        )
    assert not (tmp_path / "o").exists()


def test_ties_everywhere_resolve_by_lower_index(tmp_path):
    """A model whose updates all tie: the kept entries are the lowest flat indices."""
    pair = make_llama_pair(tmp_path / "ties", dtype=torch.bfloat16, seed=9, finetune_fraction=1.0)
    from safetensors.torch import save_file

    base = load_state_dict(pair.base)
    constant = {k: (v.float() + 0.5).to(v.dtype) for k, v in base.items()}  # |D| ties, mostly
    save_file(constant, pair.finetuned / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    run_prune(JobSpec(base=str(pair.base), finetuned=str(pair.finetuned), output=str(out),
                      method="magnitude", sparsity=0.75))  # fmt: skip
    got = load_state_dict(out)
    name = "model.layers.0.mlp.up_proj.weight"
    d = (constant[name].float() - base[name].float()).flatten()
    k = int(0.25 * d.numel() + 0.5)
    kept = (got[name].view(torch.int16) != base[name].view(torch.int16)).flatten()
    top = d.abs().max()
    if (d.abs() == top).sum() >= k:  # all kept entries are among the ties: lowest indices win
        tie_indices = torch.nonzero(d.abs() == top).flatten()[:k]
        expected = torch.zeros_like(kept)
        expected[tie_indices] = True
        assert torch.equal(kept, expected & (d != 0))
    _assert_matches_reference(
        type(pair)(pair.base, pair.finetuned, pair.dtype, pair.vocab), out, "magnitude", 0.75
    )
