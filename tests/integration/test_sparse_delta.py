"""output_format "sparse-delta" and materialize: the delta rebuilt on its base is the dense output
of the same job, byte for byte, for every task-vector method and dtype, with added vocabulary
rows, excluded tensors and a LoRA adapter; what the delta stores, read back by safetensors'
own reader and decoded by plain loops; its size at 10% density; a wrong base refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import SMALL_SHARD_SIZE
from worker.cli.app import main as fapm
from worker.engine.card import without_delta_note
from worker.evaluation.job import run_job_spec
from worker.io.staging import STAGING_MARK
from worker.spec import JobSpec

NPS_WEIGHTS = [1.0, 0.5, 1.5, 2.0, 0.25, 1.0, 1.0, 0.75]  # 8 bands; rescales the kept update
METHODS = {
    "fapm": {},
    "magnitude": {},
    "random": {"seed": 3},
    "dare": {"seed": 5},
    "breadcrumbs": {"gamma": 0.05},
    "nps": {"nps": {"weights": NPS_WEIGHTS}},
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _run(**spec) -> dict:
    return run_job_spec(JobSpec.model_validate({"kernel": "torch", **spec})).report


def _dense_and_delta(tmp_path: Path, **spec) -> tuple[Path, Path, dict]:
    dense, delta = tmp_path / "dense", tmp_path / "delta"
    _run(output=str(dense), **spec)
    report = _run(output=str(delta), output_format="sparse-delta", **spec)
    return dense, delta, report


def _materialize(base: Path, delta: Path, out: Path) -> None:
    assert fapm(["materialize", "--base", str(base), "--delta", str(delta), "--out", str(out)]) == 0


def _assert_same_model(materialized: Path, dense: Path, delta: Path) -> None:
    """Every weight file, index and side file of the dense output, byte for byte; the card is
    the delta's (its job's spec names the delta's output and format)."""
    names = sorted(p.name for p in dense.iterdir())
    assert sorted(p.name for p in materialized.iterdir()) == names
    for name in names:
        if name not in ("pruning_report.json", "README.md"):
            assert (materialized / name).read_bytes() == (dense / name).read_bytes(), name
    delta_card = (delta / "README.md").read_text()
    assert "sparse task vector" in delta_card and "fapm materialize" in delta_card
    assert (materialized / "README.md").read_text() == without_delta_note(delta_card)
    assert "sparse task vector" not in (materialized / "README.md").read_text()
    report = json.loads((materialized / "pruning_report.json").read_text())
    assert report["kind"] == "materialize"
    assert (
        report["output"]["shards"]
        == json.loads((dense / "pruning_report.json").read_text())["output"]["shards"]
    )


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("pair_name", ["bf16_pair", "fp16_pair", "fp32_pair"])
@pytest.mark.parametrize("method", list(METHODS))
def test_round_trip_is_the_dense_output(method, pair_name, request, tmp_path):
    pair = request.getfixturevalue(pair_name)
    spec = {
        "base": str(pair.base),
        "finetuned": str(pair.finetuned),
        "method": method,
        "sparsity": 0.9,
        "shard_size": SMALL_SHARD_SIZE,  # the dense output has several shards
        **METHODS[method],
    }
    dense, delta, report = _dense_and_delta(tmp_path, **spec)
    _materialize(pair.base, delta, tmp_path / "materialized")
    _assert_same_model(tmp_path / "materialized", dense, delta)
    assert len(list(dense.glob("*.safetensors"))) > 1
    section = report["sparse_delta"]
    on_disk = sum(p.stat().st_size for p in delta.glob("*.safetensors"))
    assert section["bytes"] == on_disk
    assert section["dense_output_bytes"] == sum(
        p.stat().st_size for p in dense.glob("*.safetensors")
    )
    assert on_disk < section["dense_output_bytes"] / 2


@pytest.mark.parametrize("sparsity", [0.9, 0.99])
def test_delta_stores_exactly_the_changed_entries(sparsity, bf16_pair, tmp_path):
    """safetensors' own reader and plain loops: the mask's bit j of byte i is entry 8i + j (or
    the indices list the changed positions), the values are O there in flat order, nothing else
    differs from the base."""
    dense, delta, _ = _dense_and_delta(
        tmp_path, base=str(bf16_pair.base), finetuned=str(bf16_pair.finetuned), sparsity=sparsity
    )
    manifest = json.loads((delta / "fapm-delta.json").read_text())
    stored, out, base = _tensors(delta), _tensors(dense), _tensors(bf16_pair.base)
    assert manifest["format"] == "fapm-sparse-delta/1"
    assert set(manifest["base"]["shards"]) == {"model.safetensors"}
    assert manifest["base"]["sizes"] == {
        "model.safetensors": (bf16_pair.base / "model.safetensors").stat().st_size
    }
    encodings = set()
    for entry in manifest["tensors"]:
        name = entry["name"]
        o = out[name]
        encodings.add(entry["encoding"])
        w_flat = base[entry["base"]].reshape(-1).tolist()
        o_flat = o.reshape(-1).tolist()
        ints = o.reshape(-1).view(_BITS[o.element_size()]).tolist()
        w_ints = base[entry["base"]].reshape(-1).view(_BITS[o.element_size()]).tolist()
        changed = [i for i in range(len(ints)) if ints[i] != w_ints[i]]
        assert entry["changed"] == len(changed), name
        values = stored[name + ".__values__"].reshape(-1).tolist()
        assert values == [o_flat[i] for i in changed], name
        if entry["encoding"] == "mask":
            mask = stored[name + ".__mask__"].tolist()
            assert len(mask) == math.ceil(len(o_flat) / 8)
            bits = [i for i in range(len(o_flat)) if (mask[i // 8] >> (i % 8)) & 1]
            assert bits == changed, name
        else:
            assert stored[name + ".__indices__"].tolist() == changed, name
        # Where no bit changed, O is the base's value.
        unchanged = set(range(len(o_flat))) - set(changed)
        assert all(o_flat[i] == w_flat[i] for i in unchanged if w_flat[i] == w_flat[i])
    if sparsity == 0.9:  # 10% density: a mask (1 bit per entry) beats int32 indices (3.2 bits)
        assert encodings == {"mask"}
    else:  # 1%: int32 indices (0.32 bits per entry) where they are smaller than the mask
        assert "indices" in encodings


def test_added_rows_excluded_tensors_and_a_dtype_change(added_vocab_pair, tmp_path):
    spec = {
        "base": str(added_vocab_pair.base),
        "finetuned": str(added_vocab_pair.finetuned),
        "method": "dare",
        "sparsity": 0.95,
        "exclude": "norm",  # copied whole, still coded against the base
        "dtype": "float32",  # O = cast(W) where unchanged: the cast is materialize's too
    }
    dense, delta, report = _dense_and_delta(tmp_path, **spec)
    _materialize(added_vocab_pair.base, delta, tmp_path / "materialized")
    _assert_same_model(tmp_path / "materialized", dense, delta)
    manifest = json.loads((delta / "fapm-delta.json").read_text())
    by_name = {e["name"]: e for e in manifest["tensors"]}
    embed = by_name["model.embed_tokens.weight"]
    assert embed["base_rows"] == added_vocab_pair.vocab
    rows = load_file(delta / "model.safetensors")["model.embed_tokens.weight.__rows__"]
    assert rows.shape[0] == added_vocab_pair.extra_vocab and rows.dtype == torch.float32
    norm = by_name["model.norm.weight"]
    assert norm["encoding"] != "dense" and norm["base"] == "model.norm.weight"
    assert report["sparse_delta"]["tensors_by_encoding"]["dense"] == 0


def test_lora_adapter(lora_fp32, tmp_path):
    spec = {"base": str(lora_fp32.base), "adapter": str(lora_fp32.adapter), "sparsity": 0.8}
    dense, delta, report = _dense_and_delta(tmp_path, **spec)
    _materialize(lora_fp32.base, delta, tmp_path / "materialized")
    _assert_same_model(tmp_path / "materialized", dense, delta)
    by_name = {e["name"]: e for e in json.loads((delta / "fapm-delta.json").read_text())["tensors"]}
    # Tensors the adapter does not touch equal the base: nothing of them is stored.
    assert by_name["model.layers.0.self_attn.k_proj.weight"]["changed"] == 0
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["changed"] > 0
    assert report["sparse_delta"]["finetuned_bytes"] is None  # an adapter has no dense size


def test_bf16_at_ten_percent_is_about_a_sixth_of_dense(tmp_path):
    """Per entry: 1 mask bit + 10% of 16 value bits = 2.6 of 16 bits, 16.25% of dense."""
    generator = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(512, 512, generator=generator) for i in range(4)}
    finetuned = {n: w + 0.01 * torch.randn(w.shape, generator=generator) for n, w in base.items()}
    for name, tensors in (("base", base), ("finetuned", finetuned)):
        (tmp_path / name).mkdir()
        save_file(
            {n: t.to(torch.bfloat16) for n, t in tensors.items()},
            tmp_path / name / "model.safetensors",
        )
    spec = {
        "base": str(tmp_path / "base"),
        "finetuned": str(tmp_path / "finetuned"),
        "method": "magnitude",
        "sparsity": 0.9,
    }
    dense, delta, report = _dense_and_delta(tmp_path, **spec)
    section = report["sparse_delta"]
    ratio = section["bytes"] / (tmp_path / "finetuned" / "model.safetensors").stat().st_size
    assert 0.155 < ratio < 0.17, ratio
    assert section["ratio_to_finetuned"] == pytest.approx(ratio)
    assert section["ratio_to_dense_output"] == pytest.approx(ratio, rel=1e-3)
    _materialize(tmp_path / "base", delta, tmp_path / "materialized")
    _assert_same_model(tmp_path / "materialized", dense, delta)


def test_a_different_base_is_refused(bf16_pair, fp16_pair, tmp_path, capsys):
    spec = {"base": str(bf16_pair.base), "finetuned": str(bf16_pair.finetuned)}
    delta = tmp_path / "delta"
    _run(output=str(delta), output_format="sparse-delta", **spec)
    # Another model: its files differ in size, refused before a tensor is read.
    out = tmp_path / "out"
    code = fapm(
        ["materialize", "--base", str(fp16_pair.base), "--delta", str(delta), "--out", str(out)]
    )
    assert code == 1
    assert "[base_mismatch]" in capsys.readouterr().err
    # Same sizes, one byte of one tensor changed: refused by sha256 before publishing.
    tampered = tmp_path / "tampered"
    shutil.copytree(bf16_pair.base, tampered)
    weights = tampered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    code = fapm(["materialize", "--base", str(tampered), "--delta", str(delta), "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "[base_mismatch]" in err and "nothing was published" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if STAGING_MARK in p.name]
