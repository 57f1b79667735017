"""Tensor readers: what the stream loop reads W and F through.

`CheckpointReader` reads a safetensors checkpoint. `LoraMergedReader` presents a PEFT LoRA adapter
as a fine-tuned checkpoint: F = cast(float32(W) + D) per targeted module, D = scale * B @ A in
float32, one module at a time, so the rest of the engine never knows it came from an adapter.
A DoRA adapter (`use_dora`) also rescales W + D to its magnitude vector m, as peft's merge does:
F = cast(m / ||W + D|| * (W + D)), the norm per output row (per embedding column) in float32.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from worker.engine.name_pairing import IDENTITY, find_name_map
from worker.errors import CorruptCheckpoint, SourceNotFound, UnsupportedFormat
from worker.exclude_pattern import ExcludePattern
from worker.io.checkpoint import CONFIG_LIMITS, SafetensorsCheckpoint, read_config
from worker.io.safe_json import check_size, load_json
from worker.io.safetensors_format import FLOAT_DTYPES
from worker.io.source import ModelSource
from worker.io.torch_tensors import read_tensor


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors tag
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class CheckpointReader:
    """A model directory's safetensors weights, tensor by tensor."""

    def __init__(self, source: ModelSource, identify: bool = False) -> None:
        """`identify`: the caller will ask for `identity()` (a job's report): local weight files
        are then hashed in the background from now on."""
        self.source = source
        self.checkpoint = SafetensorsCheckpoint(source, hash_in_background=identify)

    def close(self) -> None:
        self.checkpoint.close()

    def names(self) -> list[str]:
        return self.checkpoint.names()

    def info(self, name: str) -> TensorInfo:
        entry = self.checkpoint.entry(name)
        return TensorInfo(entry.dtype, entry.shape)

    def read_nbytes(self, name: str) -> int:
        """Bytes this reader fetches to produce the tensor."""
        return self.checkpoint.entry(name).nbytes

    def read(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        return read_tensor(self.checkpoint, name)

    def config(self) -> dict:
        """The model's config.json, or {} when it has none."""
        return read_config(self.source) or {}

    def identity(self) -> dict[str, object]:
        return {**self.source.identity(), "shards": self.checkpoint.shard_digests()}


@dataclass(frozen=True)
class _LoraModule:
    a: str  # adapter tensor names
    b: str
    scale: float
    transpose: bool  # D (and W) in [in, out] layout: an embedding, or fan_in_fan_out
    magnitude: str | None = None  # DoRA's lora_magnitude_vector
    base_layer: str | None = None  # W as peft saved it (`embed_tokens.base_layer.weight`)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# What an adapter tensor is, by its name less _PEFT_PREFIX: (module, part). peft saves DoRA's
# magnitude as `lora_magnitude_vector` (older releases' format, kept on save), and loads
# `lora_magnitude_vector.weight` too; with an embedding in target_modules it saves the base layer.
_ADAPTER_PART = re.compile(
    r"(.+)\.(?:(lora_A|lora_B)(?:\.weight)?|(lora_embedding_A|lora_embedding_B)"
    r"|(lora_magnitude_vector)(?:\.weight)?|(base_layer)\.weight)$"
)


def _alpha_number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CorruptCheckpoint(f"{where}: lora_alpha and alpha_pattern values must be numbers")
    return float(value)


class LoraMergedReader:
    """A base model plus a PEFT LoRA adapter, read as the merged fine-tuned model."""

    def __init__(self, base: CheckpointReader, adapter_source: ModelSource) -> None:
        self.base = base
        self.source = adapter_source
        names = adapter_source.files()
        if ADAPTER_CONFIG not in names:
            if ADAPTER_WEIGHTS.replace(".safetensors", ".bin") in names:
                raise UnsupportedFormat(
                    f"{adapter_source.uri}: adapter_model.bin is a pickle; only "
                    "adapter_model.safetensors is read"
                )
            raise SourceNotFound(f"{adapter_source.uri}: no {ADAPTER_CONFIG} (not a PEFT adapter)")
        where = f"{adapter_source.uri.rstrip('/')}/{ADAPTER_CONFIG}"
        check_size(adapter_source.size(ADAPTER_CONFIG), where, CONFIG_LIMITS, CorruptCheckpoint)
        self.adapter_config = load_json(
            adapter_source.read_file(ADAPTER_CONFIG), where, CONFIG_LIMITS, CorruptCheckpoint
        )
        self._check_supported(self.adapter_config)
        if ADAPTER_WEIGHTS not in names:
            raise SourceNotFound(f"{adapter_source.uri}: no {ADAPTER_WEIGHTS}")
        self.checkpoint = SafetensorsCheckpoint(adapter_source, weights_file=ADAPTER_WEIGHTS)
        self.modules, self.replaced = self._map_tensors()

    def _check_supported(self, config: dict) -> None:
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise UnsupportedFormat(f"adapter type {peft_type} is not supported (LoRA only)")
        if config.get("lora_bias"):
            raise UnsupportedFormat("LoRA adapters with lora_bias are not supported")

    def _alpha_for(self, module: str) -> float:
        where = f"{self.source.uri}: {ADAPTER_CONFIG}"
        pattern_alpha = self.adapter_config.get("alpha_pattern") or {}
        if not isinstance(pattern_alpha, dict):
            raise CorruptCheckpoint(f"{where}: alpha_pattern must map patterns to numbers")
        for pattern, alpha in pattern_alpha.items():
            try:  # RE2: a pattern from the adapter must not backtrack for ever
                matched = ExcludePattern(rf"^(?:.*\.)?(?:{pattern})$").matches(module)
            except ValueError as exc:
                raise CorruptCheckpoint(f"{where}: alpha_pattern {pattern[:80]!r}: {exc}") from None
            if module == pattern or matched:
                return _alpha_number(alpha, where)
        return _alpha_number(self.adapter_config.get("lora_alpha", 8), where)

    @property
    def dora(self) -> bool:
        return bool(self.adapter_config.get("use_dora"))

    def _map_tensors(self) -> tuple[dict[str, _LoraModule], dict[str, str]]:
        """LoRA modules and full replacements, keyed by the base tensor each one updates.

        The adapter names the modules of the model it was trained on, which may carry a prefix
        the base checkpoint's names do not (trained on `BertForSequenceClassification`, `bert.*`,
        for a `BertModel` base) or lack one they have: the engine's one-prefix pairing
        (worker/engine/name_pairing.py) maps them when the names do not match as they are.
        """
        base_names = set(self.base.names())
        pairs: dict[str, dict[str, str]] = {}
        replaced: dict[str, str] = {}  # adapter-side name -> adapter tensor key
        for key in self.checkpoint.names():
            name = key.removeprefix(_PEFT_PREFIX)
            match = _ADAPTER_PART.match(name)
            if match is None:
                replaced[name] = key  # modules_to_save: a full replacement tensor
                continue
            module, lora, embedding, magnitude, _ = match.groups()
            parts = pairs.setdefault(module, {})
            if lora or embedding:
                parts[(lora or embedding)[-1]] = key
                parts["embedding"] = "embedding" if embedding else ""
            elif magnitude:
                parts["magnitude"] = key
            else:
                parts["base_layer"] = key
        for module in [m for m, parts in pairs.items() if set(parts) == {"base_layer"}]:
            # A saved base layer without A and B (an untargeted, resized embedding): a replacement
            replaced[f"{module}.weight"] = pairs.pop(module)["base_layer"]
        targets = [f"{module}.weight" for module in pairs]
        name_map = IDENTITY
        if not base_names.issuperset([*targets, *replaced]):
            name_map = find_name_map(base_names, [*targets, *replaced])
        self.name_map = name_map

        def base_name(name: str) -> str | None:
            mapped = name_map.base_name(name)
            return mapped if mapped in base_names else None

        replaced_in_base: dict[str, str] = {}
        for name, key in replaced.items():
            target = base_name(name)
            if target is None:
                raise CorruptCheckpoint(
                    f"{self.source.uri}: adapter tensor {key!r} matches no base tensor"
                )
            replaced_in_base[target] = key
        modules: dict[str, _LoraModule] = {}
        fan_in_fan_out = bool(self.adapter_config.get("fan_in_fan_out", False))
        for module, parts in pairs.items():
            if "A" not in parts or "B" not in parts:
                raise CorruptCheckpoint(f"{self.source.uri}: {module} lacks lora_A or lora_B")
            target = base_name(f"{module}.weight")
            if target is None:
                raise CorruptCheckpoint(
                    f"{self.source.uri}: adapter targets {module + '.weight'!r}, which the base "
                    "lacks"
                )
            transpose = bool(parts["embedding"]) or fan_in_fan_out
            if "base_layer" in parts:
                self._check_base_layer(parts["base_layer"], target)
            if self.dora:
                self._check_magnitude(module, parts.get("magnitude"), target, transpose)
            elif "magnitude" in parts:
                raise CorruptCheckpoint(
                    f"{self.source.uri}: {parts['magnitude'][:80]!r} is a DoRA magnitude, but "
                    f"{ADAPTER_CONFIG} does not set use_dora"
                )
            self._check_factors(module, parts["A"], parts["B"], target, transpose)
            rank = self.checkpoint.entry(parts["A"]).shape[0]
            if rank == 0:
                raise CorruptCheckpoint(f"{self.source.uri}: {parts['A'][:80]!r} has rank 0")
            alpha = self._alpha_for(module)
            scale = (
                alpha / math.sqrt(rank) if self.adapter_config.get("use_rslora") else alpha / rank
            )
            modules[target] = _LoraModule(
                parts["A"], parts["B"], scale, transpose, parts.get("magnitude"),
                parts.get("base_layer"),
            )  # fmt: skip
        return modules, replaced_in_base

    def _check_factors(self, module: str, a: str, b: str, target: str, transpose: bool) -> None:
        """B @ A must be the shape of the base weight (transposed for an embedding or a
        fan_in_fan_out weight), checked from the headers before anything is written: a LoRA on
        a convolution (4-D factors) or factors of another model would otherwise fail mid-job."""
        a_shape, b_shape = self.checkpoint.entry(a).shape, self.checkpoint.entry(b).shape
        base_shape = tuple(self.base.info(target).shape)
        if len(a_shape) != 2 or len(b_shape) != 2 or len(base_shape) != 2:
            raise UnsupportedFormat(
                f"{self.source.uri}: the LoRA on {module!r} is not a matrix product (lora_A "
                f"{tuple(a_shape)}, lora_B {tuple(b_shape)}, weight {base_shape}: a convolution?); "
                "adapters are read for Linear, Conv1D and Embedding modules"
            )
        product = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        if b_shape[1] != a_shape[0] or product != base_shape:
            raise CorruptCheckpoint(
                f"{self.source.uri}: the LoRA on {module!r} (lora_A {tuple(a_shape)}, lora_B "
                f"{tuple(b_shape)}) does not make the base's {target!r} {base_shape}"
            )

    def _check_base_layer(self, key: str, target: str) -> None:
        shape, base_shape = self.checkpoint.entry(key).shape, self.base.info(target).shape
        if tuple(shape) != tuple(base_shape):
            raise UnsupportedFormat(
                f"{self.source.uri}: {key[:80]!r} has shape {tuple(shape)}, the base's "
                f"{target!r} {tuple(base_shape)} (a resized embedding is not read)"
            )

    def _check_magnitude(self, module: str, key: str | None, target: str, transpose: bool) -> None:
        """DoRA's m holds one norm per output row of W + D (per column of an embedding's); peft's
        DoRA for a convolution scales whole kernels, which this reader does not compute."""
        base_shape = tuple(self.base.info(target).shape)
        if len(base_shape) != 2:
            raise UnsupportedFormat(
                f"{self.source.uri}: DoRA on {module!r} (a {len(base_shape)}-D weight, a "
                "convolution) is not supported; DoRA is read for Linear and Embedding modules"
            )
        if key is None:
            raise CorruptCheckpoint(
                f"{self.source.uri}: {ADAPTER_CONFIG} sets use_dora, but {module!r} has no "
                "lora_magnitude_vector"
            )
        entry = self.checkpoint.entry(key)
        rows = base_shape[1] if transpose else base_shape[0]
        if tuple(entry.shape) != (rows,) or entry.dtype not in FLOAT_DTYPES:
            raise CorruptCheckpoint(
                f"{self.source.uri}: DoRA magnitude {key[:80]!r} is {entry.dtype} "
                f"{tuple(entry.shape)}; {target!r} {base_shape} needs a floating-point ({rows},)"
            )

    def names(self) -> list[str]:
        return self.base.names()

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def read_nbytes(self, name: str) -> int:
        if name in self.modules:
            module = self.modules[name]
            keys = [module.a, module.b, module.magnitude, module.base_layer]
            return sum(self.checkpoint.entry(key).nbytes for key in keys if key is not None)
        if name in self.replaced:
            return self.checkpoint.entry(self.replaced[name]).nbytes
        return 0

    def read(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """F for one tensor; `base` is W, already read by the caller."""
        if name in self.replaced:
            return read_tensor(self.checkpoint, self.replaced[name])
        if base is None:
            base = self.base.read(name)
        module = self.modules.get(name)
        if module is None:
            return base
        if module.base_layer is not None:  # peft's merge starts from the W it saved
            base = read_tensor(self.checkpoint, module.base_layer).to(base.dtype)
        a = read_tensor(self.checkpoint, module.a).to(torch.float32)
        b = read_tensor(self.checkpoint, module.b).to(torch.float32)
        delta = (b @ a) * module.scale  # the same expression as peft's get_delta_weight
        if module.transpose:
            delta = delta.T
        if tuple(delta.shape) != tuple(base.shape):
            raise CorruptCheckpoint(
                f"{self.source.uri}: LoRA delta for {name!r} has shape {tuple(delta.shape)}, "
                f"the base tensor {tuple(base.shape)}"
            )
        w = base.to(torch.float32)
        if module.magnitude is None:
            return (w + delta).to(base.dtype)
        return self._dora(module.magnitude, module.transpose, w, delta).to(base.dtype)

    def _dora(
        self, magnitude_key: str, transpose: bool, w: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        """m / ||W + D|| * (W + D) in float32, op for op peft's DoraLinearVariant.merge (and the
        embedding's): the norm over each row of the [out, in] view, so its summation order, and
        with it the output's bits, are peft's."""
        magnitude = read_tensor(self.checkpoint, magnitude_key).to(torch.float32)
        merged = w + delta  # once: the [out, in] rows are its transpose's where transposed
        factor = magnitude / torch.linalg.norm(merged.T if transpose else merged, dim=1)
        return merged.mul_(factor.view(1, -1) if transpose else factor.view(-1, 1))

    def config(self) -> dict:
        return self.base.config()

    def identity(self) -> dict[str, object]:
        return {
            **self.source.identity(),
            "shards": self.checkpoint.shard_digests(),
            "adapter_type": "DoRA" if self.dora else "LoRA",
        }

    def close(self) -> None:
        self.checkpoint.close()
