"""Causal LMs for evaluation: transformers' AutoModelForCausalLM, from safetensors only.

A local model directory is loaded in place; a remote one (s3://, hf://) has its config, tokenizer
and safetensors files copied through its `ModelSource` into a temporary directory first (the same
reads, credentials and Hub cache as the prune). `use_safetensors=True` means a pickle checkpoint
is refused, never unpickled.

Precision: float32 on CPU (bf16 matmuls on CPU are slow and round coarsely); on CUDA a 16-bit
checkpoint runs in its own dtype (an 8B model in float32 would need twice the memory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.errors import CorruptCheckpoint, SourceNotFound, UnsupportedFormat
from worker.evaluation.errors import NotCausalLM
from worker.io.source import LocalDirSource, ModelSource
from worker.io.uri import open_source

log = logging.getLogger(__name__)

_SMALL_FILES_SUFFIXES = (".json", ".model", ".txt", ".jinja")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # a transformers tokenizer
    context: int | None  # the longest input it takes (max_position_embeddings), if known


def eval_dtype(config: dict, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    stored = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(stored, torch.float32)


def context_length(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


@contextlib.contextmanager
def local_model_dir(uri: str) -> Iterator[Path]:
    """A local directory holding the model at `uri`: itself, or a temporary copy."""
    source = open_source(uri)
    try:
        if isinstance(source, LocalDirSource):
            yield source.path
            return
        with tempfile.TemporaryDirectory(prefix="fapm-eval-") as tmp:
            _copy_model_files(source, Path(tmp))
            yield Path(tmp)
    finally:
        source.close()


def _copy_model_files(source: ModelSource, directory: Path) -> None:
    for name in source.files():
        if name.endswith(".safetensors") or name.endswith(_SMALL_FILES_SUFFIXES):
            with open(directory / name, "wb") as out:
                size, offset, chunk = source.size(name), 0, 64 * 2**20
                while offset < size:
                    out.write(source.read_range(name, offset, min(chunk, size - offset)))
                    offset += chunk


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise SourceNotFound(f"{directory}: no config.json (a causal LM needs one to be evaluated)")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise CorruptCheckpoint(f"{directory}: config.json is not valid JSON") from None


def load_tokenizer(directory: Path, where: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # transformers raises many types for a missing/odd tokenizer
        raise UnsupportedFormat(f"{where}: no usable tokenizer ({exc})") from None


def load_causal_lm(
    directory: Path, device: torch.device, where: str, with_tokenizer: bool = True
) -> LoadedModel:
    """The model in `directory` on `device`, in eval mode, with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = read_config(directory)
    if not any(p.suffix == ".safetensors" for p in directory.iterdir()):
        raise UnsupportedFormat(f"{where}: no safetensors weights (pickle files are never read)")
    try:
        auto_config = AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError) as exc:
        raise NotCausalLM(f"{where}: transformers does not know this config ({exc})") from None
    if type(auto_config) not in AutoModelForCausalLM._model_mapping:
        raise NotCausalLM(
            f"{where}: model_type {config.get('model_type')!r} is not a causal LM "
            "(AutoModelForCausalLM cannot build it)"
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), use_safetensors=True, dtype=eval_dtype(config, device)
    )
    model.to(device).eval()
    tokenizer = load_tokenizer(directory, where) if with_tokenizer else None
    return LoadedModel(model, tokenizer, context_length(config))


def free(loaded: LoadedModel | None) -> None:
    if loaded is not None:
        loaded.model.to("meta")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
