"""Pairs from the wild: a fine-tune saved by another class than its base, and a base holding a
buffer that current transformers no longer saves (issue 13, items 1 and 2).

Each case is built from real transformers classes (tests/wild_models.py), pruned by the engine,
checked bit for bit against the float64 reference on the paired names, and loaded back with the
fine-tune's Auto class to show the output is a drop-in replacement.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models import load_state_dict, make_llama_pair
from tests.reference import reference_prune
from tests.wild_models import (
    add_position_ids,
    finetune_classifier,
    make_bert_head_pair,
    make_llama_head_pair,
    minilm_dir,
    swap_text_prefix,
    wrap_as_multimodal,
)
from worker.engine.name_pairing import NameMap, find_name_map
from worker.engine.pipeline import run_prune
from worker.errors import ArchitectureMismatch
from worker.spec import JobSpec

BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _prune(base: Path, finetuned: Path, out: Path, **kw) -> dict:
    spec = JobSpec(base=str(base), finetuned=str(finetuned), output=str(out), **kw)
    return run_prune(spec).report


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))
    )


def _assert_reference(
    base_dir: Path,
    ft_dir: Path,
    out: Path,
    base_name: Callable[[str], str],
    method: str,
    sparsity: float,
) -> None:
    """The output has exactly the fine-tune's tensor names; each paired float tensor equals the
    float64 reference of (base[base_name(name)], finetuned[name]); the rest are the fine-tune's."""
    base, ft, got = load_state_dict(base_dir), load_state_dict(ft_dir), load_state_dict(out)
    assert set(got) == set(ft)
    paired = 0
    for name, f in ft.items():
        w = base.get(base_name(name))
        if w is not None and f.dtype in FLOATS:
            expected, _ = reference_prune(method, w, f, sparsity, tensor_name=name)
            paired += 1
        else:
            expected = f
        assert torch.equal(got[name].view(torch.uint8), expected.contiguous().view(torch.uint8)), (
            f"{name}: output differs from the reference"
        )
    assert paired > 0


def _records(report: dict) -> dict[str, dict]:
    return {record["name"]: record for record in report["tensors"]}


def _load_drop_in(auto_class, out: Path):
    """The output through transformers' Auto class: no missing, unexpected or mismatched key."""
    model, info = auto_class.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    saved = load_state_dict(out)
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name].to(tensor.dtype), tensor), name
    return model


def test_a_base_only_int_buffer_is_left_out_and_noted(tmp_path):
    """Item 1 as reported: a BertModel base with position_ids, a BertModel fine-tune without."""
    from transformers import AutoModel, BertModel

    base_dir, _ = make_bert_head_pair(tmp_path / "pair")
    model = BertModel.from_pretrained(str(base_dir))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path / "ft"))
    assert "embeddings.position_ids" not in load_file(str(tmp_path / "ft" / "model.safetensors"))

    report = _prune(base_dir, tmp_path / "ft", tmp_path / "out", sparsity=0.9)
    _assert_reference(base_dir, tmp_path / "ft", tmp_path / "out", lambda n: n, "fapm", 0.9)
    assert report["name_map"]["finetuned_prefix"] == report["name_map"]["base_prefix"] == ""
    assert report["left_out"] == [
        {"name": "embeddings.position_ids", "dtype": "I64", "shape": [1, 40], "reason": "not_float"}
    ]
    assert any(
        "'embeddings.position_ids'" in note and "left out" in note for note in report["notes"]
    )
    assert "embeddings.position_ids" not in load_state_dict(tmp_path / "out")
    _load_drop_in(AutoModel, tmp_path / "out")


def test_a_classification_head_on_a_bertmodel_base(tmp_path):
    """Item 2: `bert.*` + `classifier.*` against a prefix-free base holding position_ids."""
    from transformers import AutoModelForSequenceClassification

    base_dir, ft_dir = make_bert_head_pair(tmp_path / "pair")
    out = tmp_path / "out"
    report = _prune(base_dir, ft_dir, out, sparsity=0.9)

    _assert_reference(base_dir, ft_dir, out, lambda n: n.removeprefix("bert."), "fapm", 0.9)
    assert report["name_map"]["finetuned_prefix"] == "bert."
    assert report["name_map"]["base_prefix"] == ""
    records = _records(report)
    assert records["classifier.weight"]["reason"] == "only_in_finetuned"
    assert records["bert.encoder.layer.0.attention.self.query.weight"]["action"] == "prune"
    assert [t["name"] for t in report["left_out"]] == ["embeddings.position_ids"]
    assert any("'bert.'" in note for note in report["notes"])
    card = (out / "README.md").read_text()
    assert "## Tensor pairing" in card and "'bert.'" in card and "position_ids" in card
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"
    ]
    model = _load_drop_in(AutoModelForSequenceClassification, out)
    logits = model(input_ids=torch.tensor([[1, 5, 7, 2]])).logits
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_a_causal_lm_on_a_llamamodel_base(tmp_path):
    """`model.*` + a new lm_head against a LlamaModel base."""
    from transformers import AutoModelForCausalLM

    base_dir, ft_dir = make_llama_head_pair(tmp_path / "pair")
    out = tmp_path / "out"
    report = _prune(base_dir, ft_dir, out, method="magnitude", sparsity=0.7)
    _assert_reference(base_dir, ft_dir, out, lambda n: n.removeprefix("model."), "magnitude", 0.7)
    assert report["name_map"]["finetuned_prefix"] == "model."
    assert _records(report)["lm_head.weight"]["reason"] == "only_in_finetuned"
    assert report["left_out"] == []
    model = _load_drop_in(AutoModelForCausalLM, out)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 4, 9]])).logits).all()


def test_the_reverse_direction_the_base_has_the_prefix(tmp_path):
    """A tied LlamaForCausalLM base (`model.*`, no lm_head saved) and a LlamaModel fine-tune."""
    from transformers import AutoModel

    base_dir, ft_dir = make_llama_head_pair(tmp_path / "pair", reverse=True)
    out = tmp_path / "out"
    report = _prune(base_dir, ft_dir, out, sparsity=0.8)
    _assert_reference(base_dir, ft_dir, out, lambda n: "model." + n, "fapm", 0.8)
    assert report["name_map"]["base_prefix"] == "model."
    assert all(record["action"] == "prune" for record in report["tensors"])
    _load_drop_in(AutoModel, out)


def test_a_multimodal_fine_tune_of_a_text_base(tmp_path):
    """`language_model.model.layers.*` (+ a vision tower) against `model.layers.*`."""
    pair = make_llama_pair(tmp_path / "text", seed=3)
    ft_dir = wrap_as_multimodal(pair.finetuned, tmp_path / "multimodal")
    out = tmp_path / "out"
    report = _prune(pair.base, ft_dir, out, sparsity=0.5)
    _assert_reference(
        pair.base, ft_dir, out, lambda n: n.removeprefix("language_model."), "fapm", 0.5
    )
    assert report["name_map"]["finetuned_prefix"] == "language_model."
    records = _records(report)
    assert records["vision_tower.patch_embed.weight"]["reason"] == "only_in_finetuned"
    assert records["language_model.lm_head.weight"]["action"] == "prune"


def test_a_multimodal_fine_tune_with_a_swapped_prefix(tmp_path):
    """`model.language_model.layers.*` + a top-level `lm_head` (transformers >= 4.52's layout)
    against a text base's `model.layers.*` and `lm_head`."""
    pair = make_llama_pair(tmp_path / "text", seed=4)
    ft_dir = swap_text_prefix(pair.finetuned, tmp_path / "multimodal")
    out = tmp_path / "out"
    report = _prune(pair.base, ft_dir, out, sparsity=0.5)

    def base_name(name: str) -> str:
        return "model." + name.removeprefix("model.language_model.")

    _assert_reference(
        pair.base,
        ft_dir,
        out,
        lambda n: base_name(n) if n.startswith("model.language_model.") else n,
        "fapm",
        0.5,
    )
    assert report["name_map"]["finetuned_prefix"] == "model.language_model."
    assert report["name_map"]["base_prefix"] == "model."
    records = _records(report)
    assert records["lm_head.weight"]["action"] == "prune"  # paired by its own name
    assert records["model.visual.patch_embed.weight"]["reason"] == "only_in_finetuned"


def test_a_base_only_float_tensor_is_still_an_error(tmp_path):
    """The head fine-tune without the pooler the base has: no prefix explains the pooler."""
    base_dir, ft_dir = make_bert_head_pair(tmp_path / "pair")
    path = ft_dir / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["bert.pooler.dense.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ArchitectureMismatch) as failure:
        _prune(base_dir, ft_dir, tmp_path / "out")
    message = str(failure.value)
    assert "'pooler.dense.weight'" in message and "'bert.'" in message
    assert not (tmp_path / "out").exists()


def test_two_prefixes_that_pair_as_many_tensors_are_ambiguous(tmp_path):
    base = {"x.weight": torch.ones(4, 4), "y.weight": torch.ones(4, 4)}
    finetuned = {"a.x.weight": torch.full((4, 4), 2.0), "b.y.weight": torch.full((4, 4), 2.0)}
    for side, tensors in (("base", base), ("ft", finetuned)):
        (tmp_path / side).mkdir()
        save_file(tensors, str(tmp_path / side / "model.safetensors"))
    with pytest.raises(ArchitectureMismatch, match="ambiguous") as failure:
        _prune(tmp_path / "base", tmp_path / "ft", tmp_path / "out")
    assert "'a.'" in str(failure.value) and "'b.'" in str(failure.value)


def test_the_pairing_picks_the_prefix_that_pairs_the_most():
    base = ["embed.weight", "layers.0.w", "layers.1.w"]
    finetuned = ["model.embed.weight", "model.layers.0.w", "model.layers.1.w", "x.layers.0.w"]
    assert find_name_map(base, finetuned) == NameMap(finetuned_prefix="model.")
    assert find_name_map(finetuned[:3], base) == NameMap(base_prefix="model.")
    assert find_name_map(base, base) == NameMap()
    # A shape (here: a `compatible` that refuses) rules a pair out.
    assert find_name_map(base, finetuned, lambda b, f: not f.startswith("model.")) == NameMap(
        finetuned_prefix="x."
    )


def test_a_lora_adapter_trained_with_a_prefix_the_base_lacks(tmp_path):
    """An adapter trained on LlamaForCausalLM (`model.layers.*`) applied to the same weights saved
    as a LlamaModel (`layers.*`): the adapter's modules pair by the prefix."""
    from transformers import LlamaForCausalLM

    from tests.models import lora_merged_state_dict, make_lora_adapter

    pair = make_llama_pair(tmp_path / "pair", dtype=torch.float32, seed=5)
    lora = make_lora_adapter(pair.base, tmp_path / "adapter")
    body_dir = tmp_path / "body"
    LlamaForCausalLM.from_pretrained(str(pair.base)).model.save_pretrained(str(body_dir))
    out = tmp_path / "out"
    spec = JobSpec(base=str(body_dir), adapter=str(lora.adapter), output=str(out), sparsity=0.6)
    run_prune(spec)
    merged = lora_merged_state_dict(pair.base, lora.adapter)
    base, got = load_state_dict(body_dir), load_state_dict(out)
    assert set(got) == set(base)
    targeted = 0
    for name, w in base.items():
        f = merged["model." + name]
        targeted += not torch.equal(f, w)
        expected, _ = reference_prune("fapm", w, f, 0.6, tensor_name=name)
        assert _same_bytes(got[name], expected), name
    assert targeted == len(lora.target_modules) * 2  # 2 layers


def test_the_real_minilm_encoder_as_base_of_a_classifier(tmp_path):
    """The packaged all-MiniLM-L6-v2 (BertModel, float32, int64 position_ids) as the base of a
    BertForSequenceClassification fine-tune saved by current transformers."""
    from transformers import AutoModelForSequenceClassification

    base_dir = minilm_dir()
    assert "embeddings.position_ids" in load_file(str(base_dir / "model.safetensors"))
    ft_dir = finetune_classifier(base_dir, tmp_path / "ft", num_labels=2)
    out = tmp_path / "out"
    report = _prune(base_dir, ft_dir, out, method="magnitude", sparsity=0.9)
    _assert_reference(base_dir, ft_dir, out, lambda n: n.removeprefix("bert."), "magnitude", 0.9)
    assert report["name_map"]["finetuned_prefix"] == "bert."
    assert [t["name"] for t in report["left_out"]] == ["embeddings.position_ids"]
    model = _load_drop_in(AutoModelForSequenceClassification, out)
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(out))("a pruned fine-tune", return_tensors="pt")
    assert torch.isfinite(model(**tokens).logits).all()


def test_evaluation_candidates_build_the_engines_pairing(tmp_path):
    """The evaluation's candidate builder plans like the engine: a candidate at the job's
    sparsity equals the published output, tensor for tensor, on the fine-tune's names."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from worker.evaluation.candidates import CandidateBuilder

    base_dir, ft_dir = make_bert_head_pair(tmp_path / "pair")
    out = tmp_path / "out"
    spec = JobSpec(base=str(base_dir), finetuned=str(ft_dir), output=str(out), sparsity=0.9)
    run_prune(spec)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(str(ft_dir)))
    builder = CandidateBuilder(spec, model, torch.device("cpu"))
    builder.write("fapm", 0.9)
    published = load_state_dict(out)
    params = dict(model.named_parameters())
    assert set(published) == set(params)
    for name, tensor in published.items():
        assert torch.equal(params[name].detach(), tensor), name


def test_position_ids_under_a_prefix_in_the_base_are_left_out_too(tmp_path):
    """A BertForSequenceClassification base saved by older transformers (`bert.embeddings.
    position_ids`) and its fine-tune saved today: identity pairing, the buffer left out."""
    _, ft_dir = make_bert_head_pair(tmp_path / "pair")
    add_position_ids(ft_dir, 40, prefix="bert.")  # the fine-tune, saved the old way, is the base
    report = _prune(ft_dir, finetune_classifier(ft_dir, tmp_path / "ft2", seed=1), tmp_path / "o")
    assert report["name_map"]["finetuned_prefix"] == report["name_map"]["base_prefix"] == ""
    assert [t["name"] for t in report["left_out"]] == ["bert.embeddings.position_ids"]


def test_scope_model_on_a_mapped_pair_equals_the_same_pair_named_alike(tmp_path):
    """Scope model's two counting passes read the base through the pairing: the output equals
    that of the same base saved under the fine-tune's names (plain identity pairing)."""
    base_dir, ft_dir = make_bert_head_pair(tmp_path / "pair")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    tensors = load_file(str(base_dir / "model.safetensors"))
    del tensors["embeddings.position_ids"]
    save_file({f"bert.{k}": v for k, v in tensors.items()}, str(renamed / "model.safetensors"))
    kw = {"method": "magnitude", "scope": "model", "sparsity": 0.85}
    mapped = _prune(base_dir, ft_dir, tmp_path / "mapped", **kw)
    plain = _prune(renamed, ft_dir, tmp_path / "plain", **kw)
    assert mapped["name_map"]["finetuned_prefix"] == "bert." and plain["left_out"] == []
    assert mapped["totals"] == plain["totals"]
    got, expected = load_state_dict(tmp_path / "mapped"), load_state_dict(tmp_path / "plain")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in got)


def test_fapm_prune_on_a_head_pair_says_how_it_paired(tmp_path):
    """The command line a user ran in the issue: it succeeds and tells the pairing on stderr."""
    import subprocess
    import sys

    base_dir, ft_dir = make_bert_head_pair(tmp_path / "pair")
    out = tmp_path / "out"
    args = ["prune", "--base", str(base_dir), "--finetuned", str(ft_dir), "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert any("'bert.'" in n for n in notes) and any("position_ids" in n for n in notes)
