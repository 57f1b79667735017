"""PEFT DoRA adapters (`use_dora: true`) as the fine-tuned side of a job, as LoRA adapters are.

F for a DoRA module is what peft's `merge_and_unload()` gives: m / ||W + D|| * (W + D), D the LoRA
update, the norm per output row (per embedding column). Each adapter here is a real peft adapter
(`LoraConfig(use_dora=True)`, saved by `save_pretrained`) whose A, B and magnitude are randomized
so that neither the update nor the rescaling is trivial. The outputs are checked against peft's
own merge, against pruning that merged model as a full fine-tune, and against an independent
float64 reference written here from the definition.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.integration.test_merge_rules import make_finetunes
from tests.models import load_state_dict, make_llama_pair
from worker.engine.pipeline import run_prune
from worker.engine.readers import ADAPTER_WEIGHTS
from worker.errors import CorruptCheckpoint, UnsupportedFormat
from worker.spec import JobSpec

LLAMA_TARGETS = ("q_proj", "v_proj", "down_proj", "embed_tokens")
GPT2_TARGETS = ("c_attn", "c_proj")  # transformers' Conv1D: W is [in, out], fan_in_fan_out
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}


@dataclass(frozen=True)
class DoraCase:
    base: Path
    adapter: Path
    model_class: str  # transformers class the adapter was trained on
    dtype: torch.dtype


def _model_class(name: str):
    import transformers

    return getattr(transformers, name)


def make_dora_adapter(
    base_dir: Path,
    adapter_dir: Path,
    model_class: str,
    target_modules: tuple[str, ...],
    dtype: torch.dtype,
    seed: int,
    fan_in_fan_out: bool = False,
    use_dora: bool = True,
) -> DoraCase:
    """A peft DoRA adapter with random A, B and magnitude, saved the way peft saves it.

    peft starts B at zero and m at ||W|| (a no-op); here B is random and m is ||W|| scaled by a
    random factor in [0.7, 1.3] per row, so the merged weight is neither W nor W + D.
    """
    from peft import LoraConfig, get_peft_model

    model = _model_class(model_class).from_pretrained(str(base_dir), dtype=dtype)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(target_modules),
        use_dora=use_dora,
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    magnitudes = 0
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                factor = 0.7 + 0.6 * torch.rand(param.shape, generator=generator)
                param.copy_((param.float() * factor).to(param.dtype))
                magnitudes += 1
            elif "lora_" in name:
                noise = 0.1 * torch.randn(param.shape, generator=generator)
                param.copy_(noise.to(param.dtype))
    assert (magnitudes > 0) == use_dora
    Path(adapter_dir).mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(adapter_dir))
    return DoraCase(Path(base_dir), Path(adapter_dir), model_class, dtype)


def peft_merged(case: DoraCase) -> dict[str, torch.Tensor]:
    """peft's own `merge_and_unload()` of the adapter, restricted to the base checkpoint's tensors."""
    from peft import PeftModel

    model = _model_class(case.model_class).from_pretrained(str(case.base), dtype=case.dtype)
    merged = PeftModel.from_pretrained(model, str(case.adapter)).merge_and_unload()
    base = load_state_dict(case.base)
    state = merged.state_dict()
    return {name: state[name].detach().clone().contiguous() for name in base}


def make_gpt2_base(directory: Path, dtype: torch.dtype) -> Path:
    """A tiny random GPT-2 (Conv1D layers: the fan_in_fan_out layout) saved as the Hub does."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(11)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    GPT2LMHeadModel(config).to(dtype).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def dora_cases(tmp_path_factory) -> dict[str, DoraCase]:
    root = tmp_path_factory.mktemp("dora")
    fp32 = make_llama_pair(root / "fp32", dtype=torch.float32, seed=21)
    bf16 = make_llama_pair(root / "bf16", dtype=torch.bfloat16, seed=22)
    gpt2 = make_gpt2_base(root / "gpt2", torch.float32)
    llama = "LlamaForCausalLM"
    return {
        "llama-fp32": make_dora_adapter(
            fp32.base, root / "a32", llama, LLAMA_TARGETS, torch.float32, seed=1
        ),
        "llama-bf16": make_dora_adapter(
            bf16.base, root / "a16", llama, LLAMA_TARGETS, torch.bfloat16, seed=2
        ),
        "gpt2-fan_in_fan_out": make_dora_adapter(
            gpt2, root / "agpt2", "GPT2LMHeadModel", GPT2_TARGETS, torch.float32, seed=3,
            fan_in_fan_out=True,
        ),
    }  # fmt: skip


def _prune_adapter(case: DoraCase, out: Path, sparsity: float) -> dict:
    spec = JobSpec(base=str(case.base), adapter=str(case.adapter), output=str(out),
                   sparsity=sparsity)  # fmt: skip
    return run_prune(spec).report


@pytest.mark.parametrize("which", ["llama-fp32", "llama-bf16", "gpt2-fan_in_fan_out"])
def test_dora_adapter_equals_pruning_peft_merge_and_unload(dora_cases, which, tmp_path):
    """At sparsity 0 the output is peft's merged model bit for bit (the same float32 operations,
    rounded once to the weight dtype); at a real sparsity it is the merged model pruned."""
    case = dora_cases[which]
    merged = peft_merged(case)
    base = load_state_dict(case.base)
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    save_file(merged, str(merged_dir / "model.safetensors"))
    changed = [name for name in base if not torch.equal(merged[name], base[name])]
    # Every targeted weight (2 layers; GPT-2's c_proj in attention and MLP), nothing else.
    assert len(changed) == (7 if which.startswith("llama") else 6), changed

    report = _prune_adapter(case, tmp_path / "adapter-0", 0.0)
    got = load_state_dict(tmp_path / "adapter-0")
    assert set(got) == set(base)
    for name in base:
        assert got[name].dtype == base[name].dtype
        torch.testing.assert_close(got[name], merged[name], rtol=0, atol=0, msg=name)
    assert report["inputs"]["adapter"]["adapter_type"] == "DoRA"
    card = (tmp_path / "adapter-0" / "README.md").read_text()
    assert f"| DoRA adapter | `{case.adapter}` |" in card

    for sparsity in (0.5, 0.9):
        via_adapter, via_merge = tmp_path / f"adapter-{sparsity}", tmp_path / f"merge-{sparsity}"
        _prune_adapter(case, via_adapter, sparsity)
        run_prune(JobSpec(base=str(case.base), finetuned=str(merged_dir), output=str(via_merge),
                          sparsity=sparsity))  # fmt: skip
        a, b = load_state_dict(via_adapter), load_state_dict(via_merge)
        assert set(a) == set(b)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
        assert any(not torch.equal(a[name], merged[name]) for name in changed)  # pruned


def dora_reference(case: DoraCase) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """F of every targeted weight in float64, from the adapter's files and the definition alone:
    V = W + (alpha / r) * B @ A (in W's layout), m / ||V|| * V with the norm over the input
    dimension of each output row: W's rows for a Linear, W's columns for an embedding (one
    magnitude per embedding dimension) and for a fan_in_fan_out Conv1D (W is [in, out]).

    With F, the scale of the terms float32 rounds: |m / ||V||| * (|W| + scale * |B| @ |A|)."""
    config = json.loads((case.adapter / "adapter_config.json").read_text())
    tensors = load_file(str(case.adapter / "adapter_model.safetensors"))
    base = load_state_dict(case.base)
    expected = {}
    for key, magnitude in tensors.items():
        if not key.endswith(".lora_magnitude_vector"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
        prefix = key.removesuffix("lora_magnitude_vector")
        embedding = f"{prefix}lora_embedding_A" in tensors
        if embedding:
            a, b = tensors[f"{prefix}lora_embedding_A"], tensors[f"{prefix}lora_embedding_B"]
        else:
            a, b = tensors[f"{prefix}lora_A.weight"], tensors[f"{prefix}lora_B.weight"]
        a, b = a.double().numpy(), b.double().numpy()
        scale = config["lora_alpha"] / a.shape[0]
        w = base[f"{module}.weight"].double().numpy()
        update = scale * np.einsum("ij,jk->ik", b, a)  # [out, in]
        terms = scale * np.einsum("ij,jk->ik", np.abs(b), np.abs(a))
        columns = embedding or config["fan_in_fan_out"]  # W is [in, out]: update transposed
        v = w + (update.T if columns else update)
        terms = np.abs(w) + (terms.T if columns else terms)
        m = magnitude.double().numpy()
        if columns:
            factor = (m / np.sqrt((v * v).sum(axis=0)))[None, :]
        else:
            factor = (m / np.sqrt((v * v).sum(axis=1)))[:, None]
        expected[f"{module}.weight"] = (v * factor, np.abs(factor) * terms)
    return expected


@pytest.mark.parametrize("which", ["llama-fp32", "llama-bf16", "gpt2-fan_in_fan_out"])
def test_dora_output_against_float64_reference(dora_cases, which, tmp_path):
    """The product's F agrees with the float64 definition within float32 arithmetic (a few
    roundings of the terms of W + D, of the norm's sum and of the factor) plus the one rounding
    to the storage dtype (half its epsilon)."""
    case = dora_cases[which]
    expected = dora_reference(case)
    assert len(expected) == (7 if which.startswith("llama") else 6)
    _prune_adapter(case, tmp_path / "out", 0.0)
    got = load_state_dict(tmp_path / "out")
    base = load_state_dict(case.base)
    unit = 2.0**-24  # float32's unit roundoff
    for name, (reference, terms) in expected.items():
        mine = got[name].double().numpy()
        bound = 8 * unit * (terms + np.abs(reference)) + EPS[case.dtype] / 2 * np.abs(reference)
        worst = float(np.max(np.abs(mine - reference) / bound))
        assert worst <= 1.0, (name, worst)
        # Not W + D: the rescaling changed every row (column) by more than the bound.
        assert not np.allclose(mine, base[name].double().numpy())


def test_a_dora_adapter_in_a_merge_is_its_merged_model(dora_cases, tmp_path):
    """A merge reads each adapter input through the same reader: a DoRA input gives the bytes
    that its peft-merged model given as a full fine-tune gives."""
    case = dora_cases["llama-fp32"]
    [full] = make_finetunes(case.base, tmp_path, 1)
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    save_file(peft_merged(case), str(merged_dir / "model.safetensors"))
    merge = {"rule": "ties", "lam": 0.9}
    outputs = {}
    for kind, item in (("adapter", {"model": str(case.adapter), "adapter": True}),
                       ("merged", {"model": str(merged_dir)})):  # fmt: skip
        finetuned = [
            {"model": str(full), "weight": 1.0, "method": "magnitude", "sparsity": 0.5},
            {**item, "weight": 0.6, "method": "fapm", "sparsity": 0.3},
        ]
        out = tmp_path / f"out-{kind}"
        result = run_prune(JobSpec(base=str(case.base), finetuned=finetuned, merge=merge,
                                   output=str(out)))  # fmt: skip
        outputs[kind] = load_state_dict(out)
        if kind == "adapter":
            models = result.report["inputs"]["models"]
            assert [m.get("adapter_type") for m in models] == [None, "DoRA"]
            assert "(DoRA adapter)" in (out / "README.md").read_text()  # the merge's card
    assert set(outputs["adapter"]) == set(outputs["merged"])
    for name, tensor in outputs["adapter"].items():
        torch.testing.assert_close(tensor, outputs["merged"][name], rtol=0, atol=0, msg=name)


EMBED = "base_model.model.model.embed_tokens"
EMBED_WEIGHT = "model.embed_tokens.weight"


def test_an_embedding_adapter_starts_from_the_base_layer_peft_saved(dora_cases, tmp_path):
    """With an embedding in target_modules peft saves its base layer too
    (`embed_tokens.base_layer.weight`) and loads it over the base's before merging: F starts
    from that W, for DoRA and plain LoRA alike (it was refused as a tensor the base lacks)."""
    case = dora_cases["llama-fp32"]
    lora = make_dora_adapter(case.base, tmp_path / "lora", "LlamaForCausalLM", LLAMA_TARGETS,
                             torch.float32, seed=4, use_dora=False)  # fmt: skip

    def moved_base_layer(config, tensors):
        tensors[f"{EMBED}.base_layer.weight"] = 1.01 * tensors[f"{EMBED}.base_layer.weight"]

    for which, adapter in (("DoRA", case), ("LoRA", lora)):
        assert f"{EMBED}.base_layer.weight" in load_file(str(adapter.adapter / ADAPTER_WEIGHTS))
        edited = _edited_adapter(adapter, tmp_path / f"{which}-edited", moved_base_layer)
        for one in (adapter, DoraCase(adapter.base, edited, adapter.model_class, adapter.dtype)):
            out = tmp_path / f"out-{which}-{one.adapter.name}"
            report = _prune_adapter(one, out, 0.0)
            assert report["inputs"]["adapter"]["adapter_type"] == which
            got, merged = load_state_dict(out), peft_merged(one)
            for name, tensor in got.items():
                torch.testing.assert_close(tensor, merged[name], rtol=0, atol=0, msg=name)
        # The edit reached F: the embedding differs from the unedited adapter's.
        assert not torch.equal(
            load_state_dict(tmp_path / f"out-{which}-{adapter.adapter.name}")[EMBED_WEIGHT],
            load_state_dict(tmp_path / f"out-{which}-{edited.name}")[EMBED_WEIGHT],
        )


def _edited_adapter(case: DoraCase, where: Path, edit) -> Path:
    """A copy of the case's adapter with `edit(config, tensors)` applied to its files."""
    shutil.copytree(case.adapter, where)
    config = json.loads((where / "adapter_config.json").read_text())
    tensors = load_file(str(where / "adapter_model.safetensors"))
    edit(config, tensors)
    (where / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(where / "adapter_model.safetensors"))
    return where


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _wrong_magnitude_shape(config, tensors):
    tensors[f"{Q0}.lora_magnitude_vector"] = tensors[f"{Q0}.lora_magnitude_vector"][:-1].clone()


def _no_magnitude(config, tensors):
    del tensors[f"{Q0}.lora_magnitude_vector"]


def _magnitude_without_use_dora(config, tensors):
    config["use_dora"] = False


def _lora_bias(config, tensors):
    config["lora_bias"] = True


REFUSED = {
    "magnitude of the wrong shape": (
        _wrong_magnitude_shape, CorruptCheckpoint,
        rf"DoRA magnitude '{Q0}.lora_magnitude_vector' is F32 \(31,\); "
        r"'model.layers.0.self_attn.q_proj.weight' \(32, 32\) needs a floating-point \(32,\)",
    ),
    "a module without its magnitude": (
        _no_magnitude, CorruptCheckpoint,
        "sets use_dora, but 'model.layers.0.self_attn.q_proj' has no lora_magnitude_vector",
    ),
    "magnitudes without use_dora": (
        _magnitude_without_use_dora, CorruptCheckpoint,
        r"lora_magnitude_vector' is a DoRA magnitude, but adapter_config.json does not set "
        "use_dora",
    ),
    "lora_bias": (_lora_bias, UnsupportedFormat, "lora_bias are not supported"),
}  # fmt: skip


@pytest.mark.parametrize("what", list(REFUSED))
def test_what_is_refused_is_refused_before_any_output(dora_cases, what, tmp_path):
    edit, error, message = REFUSED[what]
    case = dora_cases["llama-fp32"]
    adapter = _edited_adapter(case, tmp_path / "adapter", edit)
    with pytest.raises(error, match=message):
        run_prune(JobSpec(base=str(case.base), adapter=str(adapter), output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


class _ConvNet(torch.nn.Module):
    """A convolution beside a Linear: what an adapter on a convolution is trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3)
        self.proj = torch.nn.Linear(8, 8)


def _conv_base(tmp_path) -> Path:
    torch.manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in _ConvNet().state_dict().items()},
              str(base / "model.safetensors"))  # fmt: skip
    (base / "config.json").write_text("{}")
    return base


def test_dora_on_a_convolution_is_refused_naming_the_module(tmp_path):
    """peft's DoRA for Conv layers scales whole kernels; the reader computes Linear and Embedding
    DoRA only, and says so for a convolution rather than computing something else."""
    from peft import LoraConfig, get_peft_model

    base = _conv_base(tmp_path)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "proj"], use_dora=True)
    get_peft_model(_ConvNet(), config).save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(UnsupportedFormat, match=r"DoRA on 'conv' \(a 4-D weight"):
        run_prune(JobSpec(base=str(base), adapter=str(tmp_path / "adapter"),
                          output=str(tmp_path / "o")))  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_a_lora_on_a_convolution_or_of_another_model_is_refused_before_writing(tmp_path):
    """Plain LoRA too: factors that are not a matrix product of the base weight's shape (a
    convolution's 4-D ones, or an adapter trained on another model) are refused from the
    headers, naming the module, instead of failing mid-job in torch."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from worker.errors import CorruptCheckpoint

    base = _conv_base(tmp_path)
    conv = tmp_path / "conv-adapter"
    get_peft_model(_ConvNet(), LoraConfig(r=2, target_modules=["conv"])).save_pretrained(str(conv))
    with pytest.raises(UnsupportedFormat, match=r"'conv' is not a matrix product"):
        run_prune(JobSpec(base=str(base), adapter=str(conv), output=str(tmp_path / "o")))
    other = tmp_path / "other-adapter"
    get_peft_model(_ConvNet(), LoraConfig(r=2, target_modules=["proj"])).save_pretrained(str(other))
    weights = load_file(str(other / "adapter_model.safetensors"))
    (key,) = [k for k in weights if "lora_A" in k]
    weights[key] = torch.zeros((2, 16))  # A of a 16-wide layer: not this base's proj
    save_file(weights, str(other / "adapter_model.safetensors"))
    with pytest.raises(CorruptCheckpoint, match=r"'.*proj' .* does not make the base's"):
        run_prune(JobSpec(base=str(base), adapter=str(other), output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
