"""The job plan: what happens to every output tensor, decided from the headers before any read.

Rules (ALGORITHMS.md "Which tensors"): float tensors present in both checkpoints with the same shape
are pruned unless `exclude` matches; non-float tensors and tensors only in the fine-tuned
checkpoint are copied from it; an embedding or lm_head with added rows prunes the shared rows and
copies the new ones; any other shape mismatch is an error naming the tensor and both shapes.

The output has the fine-tuned checkpoint's tensor set and names. A base tensor missing from the
fine-tuned checkpoint is left out (and noted) when it is not floating point (a buffer such as
`position_ids`, which older transformers saved and current ones do not), left out silently when
it is a tied output embedding, and an error otherwise. When the names differ by one prefix (a
head on a base encoder, `model.` of a causal LM, a multimodal wrapper), the pairing is found from
the headers by worker/engine/name_pairing.py and recorded in the plan.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from worker.engine.name_pairing import IDENTITY, NameMap, find_name_map
from worker.engine.readers import TensorInfo
from worker.errors import ArchitectureMismatch, JobCancelled
from worker.exclude_pattern import ExcludePattern
from worker.io.safetensors_format import FLOAT_DTYPES
from worker.io.torch_tensors import COMPUTE_DTYPES, DTYPE_TAGS
from worker.io.writer import PlannedTensor
from worker.spec import JobSpec

Action = Literal["prune", "prune_rows", "copy"]

# Tensors whose first dimension is the vocabulary (added tokens grow it).
VOCAB_TENSOR = re.compile(r"(embed_tokens|embed_in|embed_out|lm_head|wte|word_embeddings)\b")
TIED_OUTPUT_NAMES = frozenset({"lm_head.weight", "embed_out.weight", "output.weight"})
OUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Planning a tensor takes microseconds, asking for a cancel may take a Redis round trip: between
# tensors the flag is read at most this often.
CANCEL_CHECK_SECONDS = 0.1


class TensorSource(Protocol):
    def names(self) -> list[str]: ...
    def info(self, name: str) -> TensorInfo: ...
    def read_nbytes(self, name: str) -> int: ...


@dataclass(frozen=True)
class TensorTask:
    name: str
    action: Action
    reason: str  # why it is copied, or "" when pruned
    shape: tuple[int, ...]  # the fine-tuned (= output) shape
    out_dtype: str  # safetensors tag
    shared_rows: int | None = None  # prune_rows: rows the base also has
    base_bytes: int = 0  # bytes read from the base
    finetuned_bytes: int = 0  # bytes read for the fine-tuned side
    base_name: str | None = None  # the base tensor it pairs with (None: nothing read from the base)

    @property
    def out_torch_dtype(self) -> torch.dtype:
        return {v: k for k, v in DTYPE_TAGS.items()}[self.out_dtype]

    @property
    def planned(self) -> PlannedTensor:
        return PlannedTensor(self.name, self.out_dtype, self.shape)

    @property
    def read_bytes(self) -> int:
        return self.base_bytes + self.finetuned_bytes


def cancel_point(
    should_cancel: Callable[[], bool] | None, every_seconds: float = CANCEL_CHECK_SECONDS
) -> Callable[[], None]:
    """A function to call between steps: raises JobCancelled when `should_cancel()` says so,
    asking it at most every `every_seconds` (the first call asks)."""
    if should_cancel is None:
        return lambda: None
    asked_at = -float("inf")

    def check() -> None:
        nonlocal asked_at
        now = time.monotonic()
        if now - asked_at < every_seconds:
            return
        asked_at = now
        if should_cancel():
            raise JobCancelled("the job was cancelled")

    return check


@dataclass(frozen=True)
class LeftOut:
    """A base tensor the output does not have (the fine-tuned checkpoint lacks it)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    reason: str  # "not_float" (a buffer) or "tied_output" (the output shares the embedding)

    def as_report(self) -> dict[str, object]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Plan:
    tasks: list[TensorTask]  # one per output tensor, in the fine-tuned checkpoint's order
    name_map: NameMap  # how fine-tuned names pair with base names
    left_out: list[LeftOut]  # base tensors not in the output

    @property
    def notes(self) -> list[str]:
        """What a user should know about the pairing, in words (the report's `notes`)."""
        notes = []
        if not self.name_map.is_identity:
            only_finetuned = [t.name for t in self.tasks if t.reason == "only_in_finetuned"]
            note = f"tensor names paired by prefix: {self.name_map.describe()}"
            if only_finetuned:
                note += (
                    f"; {len(only_finetuned)} tensor(s) only in the fine-tuned checkpoint "
                    f"(such as {only_finetuned[0]!r}) are copied from it"
                )
            notes.append(note)
        buffers = [t for t in self.left_out if t.reason == "not_float"]
        if buffers:
            first = buffers[0]
            notes.append(
                f"{len(buffers)} base tensor(s) missing from the fine-tuned checkpoint are not "
                f"floating-point parameters (such as {first.name!r}, {first.dtype} "
                f"{list(first.shape)}, a buffer) and are left out: the output follows the "
                "fine-tuned checkpoint's tensor set"
            )
        return notes


def tie_word_embeddings(config: dict) -> bool:
    """Whether the model's config ties lm_head to the input embedding (a missing lm_head is then
    the tie, not a gap)."""
    # transformers' PretrainedConfig default is True; Llama-style configs write it explicitly.
    value = config.get(
        "tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", True)
    )
    return bool(value)


def _dtype_class(tag: str) -> str:
    if tag in FLOAT_DTYPES:
        return "float"
    return "bool" if tag == "BOOL" else "int"


def _adds_rows(name: str, base_shape: tuple[int, ...], ft_shape: tuple[int, ...]) -> bool:
    """An embedding or lm_head whose fine-tune grew the vocabulary (added tokens)."""
    return bool(
        VOCAB_TENSOR.search(name)
        and len(base_shape) == len(ft_shape) >= 1
        and base_shape[1:] == ft_shape[1:]
        and ft_shape[0] > base_shape[0]
    )


def _is_tied_output(name: str) -> bool:
    """lm_head.weight and its kin, also under a prefix (`language_model.lm_head.weight`)."""
    return any(name == tied or name.endswith("." + tied) for tied in TIED_OUTPUT_NAMES)


def pair_tensor_names(
    base: TensorSource,
    finetuned: TensorSource,
    tie_word_embeddings: bool,
    check_cancel: Callable[[], None] = lambda: None,
) -> NameMap:
    """The identity when every base tensor the output needs is in the fine-tuned checkpoint under
    its own name (the usual case: no search); else the one-prefix map that pairs the most."""

    def must_pair(name: str) -> bool:
        if tie_word_embeddings and _is_tied_output(name):
            return False
        return base.info(name).dtype in FLOAT_DTYPES

    ft_name_set = set(finetuned.names())
    unpaired = False
    for name in base.names():
        check_cancel()
        if name not in ft_name_set and must_pair(name):
            unpaired = True
            break
    if not unpaired:
        return IDENTITY

    def compatible(base_name: str, ft_name: str) -> bool:
        w, ft = base.info(base_name), finetuned.info(ft_name)
        if _dtype_class(w.dtype) != _dtype_class(ft.dtype):
            return False
        return w.shape == ft.shape or _adds_rows(ft_name, w.shape, ft.shape)

    return find_name_map(base.names(), finetuned.names(), compatible, check_cancel)


def build_plan(
    base: TensorSource,
    finetuned: TensorSource,
    spec: JobSpec,
    tie_word_embeddings: bool,
    should_cancel: Callable[[], bool] | None = None,
) -> Plan:
    """One task per output tensor, in the fine-tuned checkpoint's storage order, named as there.

    `should_cancel` is asked between tensors (at most every CANCEL_CHECK_SECONDS): a checkpoint
    can hold millions of tensors, and a cancelled job should not plan them all.
    """
    exclude = ExcludePattern(spec.exclude) if spec.exclude else None
    check_cancel = cancel_point(should_cancel)
    name_map = pair_tensor_names(base, finetuned, tie_word_embeddings, check_cancel)
    base_names = set(base.names())
    ft_names = finetuned.names()
    paired = {name_map.base_name(n) for n in ft_names} & base_names  # once: no per-name scan
    left_out = []
    for name in base.names():
        if name in paired:
            continue
        check_cancel()
        w = base.info(name)
        if w.dtype not in FLOAT_DTYPES:
            left_out.append(LeftOut(name, w.dtype, w.shape, "not_float"))
        elif tie_word_embeddings and _is_tied_output(name):
            left_out.append(LeftOut(name, w.dtype, w.shape, "tied_output"))
        else:
            mapped = "" if name_map.is_identity else f" ({name_map.describe()})"
            raise ArchitectureMismatch(
                f"tensor {name!r} (shape {list(w.shape)}) is in the base but not in "
                f"the fine-tuned checkpoint{mapped}: are these the same architecture?"
            )

    tasks = []
    for name in ft_names:
        check_cancel()
        ft = finetuned.info(name)
        out_dtype = OUT_DTYPES.get(spec.dtype, ft.dtype) if ft.dtype in FLOAT_DTYPES else ft.dtype
        ft_bytes = finetuned.read_nbytes(name)

        def copy(
            reason: str,
            name: str = name,
            out_dtype: str = out_dtype,
            ft: TensorInfo = ft,
            ft_bytes: int = ft_bytes,
        ) -> TensorTask:
            return TensorTask(name, "copy", reason, ft.shape, out_dtype, finetuned_bytes=ft_bytes)

        base_name = name_map.base_name(name)
        if base_name is None or base_name not in base_names:
            tasks.append(copy("only_in_finetuned"))
            continue
        w = base.info(base_name)
        if ft.dtype not in FLOAT_DTYPES:
            tasks.append(copy("not_float"))
            continue
        if w.shape != ft.shape:
            if _adds_rows(name, w.shape, ft.shape):
                action: Action = "prune_rows"
            else:
                in_base = "" if base_name == name else f" (as {base_name!r})"
                raise ArchitectureMismatch(
                    f"tensor {name!r} has shape {list(w.shape)} in the base{in_base} but "
                    f"{list(ft.shape)} in the fine-tuned checkpoint: different architectures?"
                )
        else:
            action = "prune"
        if exclude is not None and exclude.matches(name):
            tasks.append(copy("excluded"))
            continue
        if ft.dtype not in COMPUTE_DTYPES or w.dtype not in FLOAT_DTYPES:
            tasks.append(copy(f"unsupported_dtype_{ft.dtype.lower()}"))
            continue
        tasks.append(
            TensorTask(
                name,
                action,
                "",
                ft.shape,
                out_dtype,
                shared_rows=w.shape[0] if action == "prune_rows" else None,
                base_bytes=base.read_nbytes(base_name),
                finetuned_bytes=ft_bytes,
                base_name=base_name,
            )
        )
    return Plan(tasks, name_map, left_out)
