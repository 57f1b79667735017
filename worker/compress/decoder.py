"""A decoder-only causal LM, one decoder layer at a time, straight from its safetensors.

The model is never built whole: its skeleton is built on the `meta` device (no memory) to learn
where the decoder layers are and what class they are. The "stem" (the base model without its
layers: the token embedding, the rotary or other position encoding, the attention-mask logic) is
built on the CPU with the checkpoint's embedding, and run once per calibration sequence up to the
first layer, where a catcher records the layer's inputs (hidden states and the keyword arguments
the model passes every layer: position embeddings, position ids, mask). Then each layer is built
on its own from its tensors, used, and dropped.

Works for the architectures whose layers take (hidden_states, **kwargs) and whose position
encoding lives in the stem (Llama, Mistral, Qwen2/3, Gemma, Phi-3 and most current decoders in
transformers). Anything else is refused with `unsupported_architecture` before any work.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from worker.engine.readers import CheckpointReader
from worker.errors import FapmError


class UnsupportedArchitecture(FapmError, ValueError):
    """A model the layer walker cannot walk (not a decoder-only causal LM it knows the shape of)."""

    code = "unsupported_architecture"


@dataclass
class DecoderLayout:
    """Where the decoder layers are, in the checkpoint's names."""

    config: object  # transformers PretrainedConfig
    stem_prefix: str  # "model." : the base model's tensors
    layers_prefix: str  # "model.layers."
    count: int
    layer_class: type[nn.Module]

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}{index}."

    def layer_of(self, name: str) -> int | None:
        """The decoder layer a checkpoint tensor belongs to, or None (stem, head)."""
        if not name.startswith(self.layers_prefix):
            return None
        head = name[len(self.layers_prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None


def decoder_layout(config_dict: dict, where: str) -> DecoderLayout:
    """Find the decoder layers of the model `config_dict` describes (config.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config_dict.get("model_type")
    try:
        config = AutoConfig.for_model(
            str(model_type), **{k: v for k, v in config_dict.items() if k != "model_type"}
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise UnsupportedArchitecture(
            f"{where}: transformers does not know this config ({exc})"
        ) from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise UnsupportedArchitecture(
            f"{where}: model_type {str(model_type)[:80]!r} is not a causal LM"
        )
    # sdpa needs no materialised (tokens x tokens) mask for an unpadded sequence.
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    stem_name = skeleton.base_model_prefix
    stem = getattr(skeleton, stem_name, None)
    count = getattr(config, "num_hidden_layers", None)
    layers = None if stem is None else getattr(stem, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not count or len(layers) != count:
        raise UnsupportedArchitecture(
            f"{where}: {type(skeleton).__name__} has no list of decoder layers the walker knows "
            "(expected <base model>.layers with num_hidden_layers entries)"
        )
    return DecoderLayout(
        config=config,
        stem_prefix=f"{stem_name}.",
        layers_prefix=f"{stem_name}.layers.",
        count=count,
        layer_class=type(layers[0]),
    )


class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor, kwargs: dict) -> None:
        super().__init__("captured")
        self.hidden = hidden
        self.kwargs = kwargs


class _Catcher(nn.Module):
    """Stands in for layer 0: records its inputs and stops the forward there."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.__dict__["wrapped"] = layer  # not a submodule: its (meta) tensors stay out

    def __getattr__(self, name: str):  # attributes the stem reads off a layer (attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["wrapped"], name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        raise _Captured(hidden_states, kwargs)


class Stem:
    """The base model without its layers, on the CPU, able to produce layer 0's inputs."""

    def __init__(self, layout: DecoderLayout, reader: CheckpointReader) -> None:
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(layout.config)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        stem = getattr(skeleton, layout.stem_prefix[:-1])
        catcher = _Catcher(stem.layers[0])
        stem.layers = nn.ModuleList([catcher])
        # The stem's own tensors from the checkpoint (the embedding; norms are not used before
        # layer 0 but are loaded so nothing stays on meta by accident).
        state = {}
        for name in stem.state_dict():
            full = layout.stem_prefix + name
            if full not in reader.names():
                raise UnsupportedArchitecture(
                    f"the checkpoint has no {full!r}, which the model's stem needs"
                )
            state[name] = reader.read(full)
        stem.load_state_dict(state, strict=True, assign=True)
        _rebuild_meta_buffers(stem, config)
        stem.eval()
        self.stem = stem

    def layer_inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(hidden states (1, tokens, hidden) float32, layer kwargs) of one token sequence."""
        try:
            with torch.inference_mode():
                self.stem(input_ids=ids[None, :], use_cache=False)
        except _Captured as captured:
            kwargs = {k: _to_float32(v) for k, v in captured.kwargs.items()}
            kwargs.pop("past_key_value", None)
            kwargs.pop("past_key_values", None)
            kwargs["use_cache"] = False
            return captured.hidden.to(torch.float32), kwargs
        raise UnsupportedArchitecture("the model's forward never reached its first layer")


def _to_float32(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.float32)
    if isinstance(value, tuple):
        return tuple(_to_float32(v) for v in value)
    return value


def _rebuild_meta_buffers(stem: nn.Module, config) -> None:
    """Non-persistent buffers (e.g. a rotary embedding's inv_freq) are computed at construction,
    not stored: rebuild each module that still holds one on the CPU from the config."""
    for name, module in list(stem.named_modules()):
        meta = [b for b in module.buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        try:
            rebuilt = type(module)(config=config)
        except TypeError as exc:
            raise UnsupportedArchitecture(
                f"cannot rebuild {type(module).__name__} ({name}) from the config: {exc}"
            ) from None
        parent, _, attribute = name.rpartition(".")
        setattr(stem.get_submodule(parent) if parent else stem, attribute, rebuilt)
    left = [n for n, t in [*stem.named_parameters(), *stem.named_buffers()] if t.is_meta]
    if left:
        raise UnsupportedArchitecture(f"the stem keeps tensors with no values: {left[:5]}")


def load_layer(
    layout: DecoderLayout, reader: CheckpointReader, index: int
) -> tuple[nn.Module, dict[str, str]]:
    """Decoder layer `index` in float32 on the CPU, and its tensors' checkpoint names."""
    with torch.device("meta"):
        try:
            layer = layout.layer_class(layout.config, index)
        except TypeError as exc:
            raise UnsupportedArchitecture(
                f"{layout.layer_class.__name__} is not built as (config, layer_idx): {exc}"
            ) from None
    prefix = layout.layer_prefix(index)
    names = {local: prefix + local for local in layer.state_dict()}
    missing = [full for full in names.values() if full not in reader.names()]
    if missing:
        raise UnsupportedArchitecture(f"layer {index}: the checkpoint lacks {missing[:3]}")
    state = {local: reader.read(full).to(torch.float32) for local, full in names.items()}
    layer.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in layer.buffers()):
        raise UnsupportedArchitecture(
            f"{layout.layer_class.__name__} holds computed buffers the walker cannot rebuild"
        )
    return layer.eval(), names


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The layer's output hidden states (older transformers return a tuple)."""
    with torch.inference_mode():
        out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def linear_modules(layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The layer's nn.Linear modules (attention and MLP projections), in definition order."""
    return [(name, m) for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


Cancel = Callable[[], bool]
