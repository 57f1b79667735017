"""A merge's models written into the work model: its candidates and each input as a reference.

A candidate (method, sparsity) is the merge engine's own output (worker/engine/merge.py
`merged_outputs`: MergedReader.read per tensor, then the stream loop's pass-through rounding to
the output dtype), so its weights are what `run_prune` publishes for that merge, bit for bit.
Nothing is held between candidates: each one reads and prunes every input again (n inputs, n
reads of the task vectors per candidate; the single pair's ranks do not apply, since the merged
update at one sparsity is not a prefix of another's).

An input's reference is its fine-tuned weights as the output dtype stores them, written by the
single pair's CandidateBuilder (so LoRA adapters and name prefixes pair with the base as in a
prune).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from worker.engine.merge import input_spec, merged_outputs
from worker.errors import ArchitectureMismatch
from worker.evaluation.candidates import CandidateBuilder
from worker.spec import JobSpec


def candidate_spec(spec: JobSpec, method: str, sparsity: float) -> JobSpec:
    """The merge at (method, sparsity): the inputs that name no method or sparsity take these
    (what the published job's concrete spec says once the search chose them)."""
    return spec.model_copy(
        update={"method": method, "sparsity": sparsity, "methods": None, "target": None}
    )


def write_merged(
    spec: JobSpec,
    model: torch.nn.Module,
    method: str,
    sparsity: float,
    should_cancel: Callable[[], bool] | None = None,
) -> float:
    """Put the merge at (method, sparsity) into `model`'s parameters; returns the seconds."""
    started = time.perf_counter()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for task, out in merged_outputs(candidate_spec(spec, method, sparsity), should_cancel):
            param = params.get(task.name)
            if param is None or tuple(param.shape) != tuple(task.shape):
                raise ArchitectureMismatch(
                    f"tensor {task.name!r} of the merge is not a parameter of shape "
                    f"{list(task.shape)} in the model transformers builds from its config"
                )
            param.copy_(out.to(param.dtype))
    return time.perf_counter() - started


def write_input(
    spec: JobSpec,
    index: int,
    model: torch.nn.Module,
    device: torch.device,
    should_cancel: Callable[[], bool] | None = None,
) -> None:
    """Put input `index`'s fine-tuned weights (as the output dtype stores them) into `model`."""
    inputs = spec.merge_inputs
    assert inputs is not None
    builder = CandidateBuilder(input_spec(spec, inputs[index]), model, device, should_cancel, 0)
    builder.write_finetuned()  # (a budget of 0: no ranks, the fine-tune is all it writes)
