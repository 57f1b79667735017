"""The job plan: what happens to every output tensor, decided from the headers before any read.

Rules (ALGORITHMS.md "Which tensors"): float tensors present in both checkpoints with the same shape
are pruned unless `exclude` matches; non-float tensors and tensors only in the fine-tuned
checkpoint are copied from it; an embedding or lm_head with added rows prunes the shared rows and
copies the new ones; a base tensor missing from the fine-tuned checkpoint is an error unless it is
a tied output embedding; any other shape mismatch is an error naming the tensor and both shapes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

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


def build_plan(
    base: TensorSource,
    finetuned: TensorSource,
    spec: JobSpec,
    tie_word_embeddings: bool,
    should_cancel: Callable[[], bool] | None = None,
) -> list[TensorTask]:
    """One task per output tensor, in the fine-tuned checkpoint's storage order.

    `should_cancel` is asked between tensors (at most every CANCEL_CHECK_SECONDS): a checkpoint
    can hold millions of tensors, and a cancelled job should not plan them all.
    """
    exclude = ExcludePattern(spec.exclude) if spec.exclude else None
    check_cancel = cancel_point(should_cancel)
    base_names = set(base.names())
    ft_names = finetuned.names()
    ft_name_set = set(ft_names)  # once: a set per base name made this quadratic
    missing = [n for n in base.names() if n not in ft_name_set]
    for name in missing:
        check_cancel()
        if not (name in TIED_OUTPUT_NAMES and tie_word_embeddings):
            raise ArchitectureMismatch(
                f"tensor {name!r} (shape {list(base.info(name).shape)}) is in the base but not in "
                "the fine-tuned checkpoint: are these the same architecture?"
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

        if name not in base_names:
            tasks.append(copy("only_in_finetuned"))
            continue
        w = base.info(name)
        if ft.dtype not in FLOAT_DTYPES:
            tasks.append(copy("not_float"))
            continue
        if w.shape != ft.shape:
            if (
                VOCAB_TENSOR.search(name)
                and len(w.shape) == len(ft.shape) >= 1
                and w.shape[1:] == ft.shape[1:]
                and ft.shape[0] > w.shape[0]
            ):
                action: Action = "prune_rows"
            else:
                raise ArchitectureMismatch(
                    f"tensor {name!r} has shape {list(w.shape)} in the base but "
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
                base_bytes=base.read_nbytes(name),
                finetuned_bytes=ft_bytes,
            )
        )
    return tasks
