"""Causal LMs for evaluation: transformers' AutoModelForCausalLM, from safetensors only.

A local model directory is loaded in place; a remote one (s3://, hf://) has its config, tokenizer
and safetensors files copied through its `ModelSource` into a temporary directory first (the same
reads, credentials and Hub cache as the prune). `use_safetensors=True` means a pickle checkpoint
is refused, never unpickled.

Precision: float32 on CPU (bf16 matmuls on CPU are slow and round coarsely); on CUDA a 16-bit
checkpoint runs in its own dtype (an 8B model in float32 would need twice the memory).

Added vocabulary: a fine-tune whose embeddings (and lm_head) have more rows than the base's (tokens
added with `resize_token_embeddings`) is measured with its own tokenizer, so the sets may hold ids
the base has no row for. The base is then measured with its embeddings grown to the fine-tune's
rows and the fine-tune's added rows copied in (`add_vocabulary`): every other weight is the base's,
and those rows are what a prune publishes for them at any sparsity (ALGORITHMS.md: the shared rows
are pruned, the added ones copied), so the base reference is the end of the candidates' line
(sparsity 1) and nothing is clipped or re-tokenized.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.errors import (
    ArchitectureMismatch,
    CorruptCheckpoint,
    JobCancelled,
    SourceNotFound,
    UnsupportedFormat,
)
from worker.evaluation.errors import NotCausalLM
from worker.io.checkpoint import CONFIG_FILE, CONFIG_LIMITS, parse_config
from worker.io.safe_json import check_size
from worker.io.scratch import ScratchDir
from worker.io.source import LocalDirSource, ModelSource, also_readable
from worker.io.uri import open_source

log = logging.getLogger(__name__)

_SMALL_FILES_SUFFIXES = (".json", ".model", ".txt", ".jinja")


# What transformers raises for a config.json whose values it cannot use (a string where it
# wants a number, an unknown model_type, a shape that does not match the weights).
_CONFIG_ERRORS = (ValueError, KeyError, TypeError, AttributeError, OverflowError)


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
def local_model_dir(uri: str, should_cancel: Callable[[], bool] | None = None) -> Iterator[Path]:
    """A local directory holding the model at `uri`: for a local model, links to its checked
    open files (_link_checked_files); for a remote one, a temporary copy (a cancelled job stops
    the copy between 64 MiB reads)."""
    source = open_source(uri)
    try:
        # A scratch directory is swept if this process is killed (worker/io/scratch.py).
        if isinstance(source, LocalDirSource):
            with ScratchDir("eval-view") as view, also_readable(view):
                _link_checked_files(source, view)
                yield view
            return
        with ScratchDir("eval") as tmp, also_readable(tmp):
            _copy_model_files(source, tmp, should_cancel or (lambda: False))
            yield tmp
    finally:
        source.close()


def _link_checked_files(source: LocalDirSource, view: Path) -> None:
    """Fill `view` with a link per file of `source` to the descriptor the source opened and
    checked against the job's roots. transformers opens files by path: through these links it
    reads exactly the files that were checked, even if a name in the model's directory is
    swapped meanwhile (for a symlink that leads out of the roots, say)."""
    source.verify_files()
    for name in source.files():
        (view / name).symlink_to(f"/proc/self/fd/{source.descriptor(name)}")


def _copy_model_files(
    source: ModelSource, directory: Path, should_cancel: Callable[[], bool]
) -> None:
    for name in source.files():
        if name.endswith(".safetensors") or name.endswith(_SMALL_FILES_SUFFIXES):
            with open(directory / name, "wb") as out:
                size, offset, chunk = source.size(name), 0, 64 * 2**20
                while offset < size:
                    if should_cancel():
                        raise JobCancelled("the job was cancelled")
                    out.write(source.read_range(name, offset, min(chunk, size - offset)))
                    offset += chunk


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.exists():
        raise SourceNotFound(f"{directory}: no config.json (a causal LM needs one to be evaluated)")
    # Checked here, before transformers parses the same file with plain json.
    check_size(path.stat().st_size, str(path), CONFIG_LIMITS, CorruptCheckpoint)
    return parse_config(path.read_bytes(), str(path))


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
    except _CONFIG_ERRORS as exc:
        raise NotCausalLM(f"{where}: transformers does not know this config ({exc})") from None
    if type(auto_config) not in AutoModelForCausalLM._model_mapping:
        raise NotCausalLM(
            f"{where}: model_type {str(config.get('model_type'))[:80]!r} is not a causal LM "
            "(AutoModelForCausalLM cannot build it)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), use_safetensors=True, dtype=eval_dtype(config, device)
        )
    except torch.OutOfMemoryError:
        raise
    except (*_CONFIG_ERRORS, RuntimeError) as exc:  # config values that build no model
        raise CorruptCheckpoint(
            f"{where}: transformers cannot build the model its config.json describes ({exc})"
        ) from None
    model.to(device).eval()
    tokenizer = load_tokenizer(directory, where) if with_tokenizer else None
    return LoadedModel(model, tokenizer, context_length(config))


def vocabulary_rows(model: torch.nn.Module) -> int:
    """How many token ids the model can both take and predict."""
    rows = model.get_input_embeddings().weight.shape[0]
    output = model.get_output_embeddings()
    if output is not None and getattr(output, "weight", None) is not None:
        rows = min(rows, output.weight.shape[0])
    return rows


@dataclass
class Vocabulary:
    """A model's input and output embedding weights (references, not copies)."""

    input: torch.Tensor
    output: torch.Tensor | None
    output_bias: torch.Tensor | None

    @classmethod
    def of(cls, model: torch.nn.Module) -> Vocabulary:
        output = model.get_output_embeddings()
        weight = None if output is None else getattr(output, "weight", None)
        bias = None if output is None else getattr(output, "bias", None)
        return cls(
            model.get_input_embeddings().weight.detach(),
            None if weight is None else weight.detach(),
            None if bias is None else bias.detach(),
        )


def add_vocabulary(model: torch.nn.Module, donor: Vocabulary, where: str) -> int:
    """Grow `model`'s (the base's) embeddings and lm_head to the donor's (the fine-tune's) rows,
    the added rows copied from the donor; returns how many rows were added (0: none missing)."""
    embeddings = model.get_input_embeddings()
    rows, target = embeddings.weight.shape[0], donor.input.shape[0]
    if target <= rows:
        return 0
    if tuple(donor.input.shape[1:]) != tuple(embeddings.weight.shape[1:]):
        raise ArchitectureMismatch(
            f"{where}: its embeddings have shape {list(embeddings.weight.shape)} but the "
            f"fine-tune's {list(donor.input.shape)}: different architectures?"
        )
    model.resize_token_embeddings(target, mean_resizing=False)
    with torch.no_grad():
        grown = model.get_input_embeddings().weight
        grown[rows:] = donor.input[rows:].to(grown.device, grown.dtype)
        output = model.get_output_embeddings()
        weight = None if output is None else getattr(output, "weight", None)
        if weight is not None and weight is not grown:  # untied: lm_head's own added rows
            source = donor.output if donor.output is not None else donor.input
            if source.shape[0] != weight.shape[0]:
                raise ArchitectureMismatch(
                    f"{where}: the fine-tune's lm_head has {source.shape[0]} rows and its "
                    f"embeddings {target}: cannot give the base the same added vocabulary"
                )
            weight[rows:] = source[rows:].to(weight.device, weight.dtype)
        bias = None if output is None else getattr(output, "bias", None)
        if bias is not None and donor.output_bias is not None:
            bias[rows:] = donor.output_bias[rows:].to(bias.device, bias.dtype)
    return target - rows


def added_vocabulary_note(rows: int, donor: str) -> str | None:
    if not rows:
        return None
    return (
        f"the base was measured with the {rows} vocabulary rows it lacks (added tokens) copied "
        f"from {donor}, as a pruned model has them"
    )


def free(loaded: LoadedModel | None) -> None:
    if loaded is not None:
        loaded.model.to("meta")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
