"""A merge's validation (JobSpec with finetuned as a list): what each input and the job's
sections may ask for together. JobSpec's `_merge_fits` validator calls `check_merge`; the errors
are ValueErrors naming the field, which the API turns into a 422."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.spec.merge import MAX_MERGE_INPUTS, NOT_FOR_MERGES, MergeInput
from worker.spec.nps import band_edges

if TYPE_CHECKING:
    from worker.spec.job import JobSpec


def check_merge(spec: JobSpec, task_vector_methods: tuple[str, ...]) -> None:
    """What a merge (finetuned as a list) may ask for; ValueError (a 422) naming the field."""
    inputs = spec.merge_inputs
    if inputs is None:
        if spec.merge is not None:
            raise ValueError("merge: applies to a list of finetuned models")
        return
    if not inputs:
        raise ValueError("finetuned: a merge needs at least one model")
    if len(inputs) > MAX_MERGE_INPUTS:  # each input is a source opened and read per tensor
        raise ValueError(f"finetuned: a merge takes at most {MAX_MERGE_INPUTS} models")
    # Inputs without a method of their own take the job's (sparsity "auto": each of methods).
    for i, item in enumerate(inputs):
        for method in [item.method] if item.method else spec.search_methods:
            if method not in task_vector_methods or (method == "nps" and spec.auto):
                raise ValueError(f"finetuned: [{i}] method {method}: {NOT_FOR_MERGES}")
    if spec.sparsity == "auto" and all(item.sparsity is not None for item in inputs):
        raise ValueError(
            'sparsity: "auto" searches the sparsity of the inputs that name none, and every '
            "input names its own: nothing to search"
        )
    if spec.methods is not None and all(item.method is not None for item in inputs):
        raise ValueError(
            "methods: they apply to the inputs that name no method, and every input names "
            "its own: nothing to search"
        )
    _evaluation_fits(spec, inputs)
    _nps_fits(spec, inputs)
    if spec.scope == "model":
        raise ValueError(f"scope: model is {NOT_FOR_MERGES} (tensor or row)")
    if spec.merge is not None and spec.merge.rule == "nps_fusion":
        if spec.merge.normalize is not None:
            raise ValueError("merge: normalize: nps_fusion divides by the kept count")


def _evaluation_fits(spec: JobSpec, inputs: list[MergeInput]) -> None:
    """evaluate on a merge measures each input on its own task set (finetuned[i].task)."""
    if spec.evaluate is None:
        if spec.auto:  # _auto_needs_evaluation says evaluate is missing
            return
        for i, item in enumerate(inputs):
            if item.task is not None:
                raise ValueError(
                    f"finetuned: [{i}] task: is measured with evaluate only (give evaluate "
                    "{general})"
                )
        return
    if spec.evaluate.general is None:
        raise ValueError("evaluate: general: required (a merge's forgetting is measured on it)")
    if spec.evaluate.task is not None:
        raise ValueError(
            "evaluate.task: a merge measures each fine-tune on its own task set: put the "
            "task sets on the inputs (finetuned[i].task), not in evaluate"
        )
    for i, item in enumerate(inputs):
        if item.task is None:
            raise ValueError(
                f"finetuned: [{i}] task: evaluate on a merge measures every input on its own "
                'task set: give each input a task (JSONL of {"prompt", "completion"})'
            )


def _nps_fits(spec: JobSpec, inputs: list[MergeInput]) -> None:
    """nps on a merge: each nps input's band weights are given (nps_weights: publish) or,
    for none of them, searched with every nps input's and the merge's lam at once."""
    pruned_by_nps = [i for i, item in enumerate(inputs) if spec.input_method(item) == "nps"]
    for i, item in enumerate(inputs):
        if item.nps_weights is not None and i not in pruned_by_nps:
            raise ValueError(f'finetuned: [{i}] nps_weights: apply to method "nps" only')
    if not pruned_by_nps:
        if spec.nps is not None:
            raise ValueError('nps: applies to method "nps" only')
        return
    if spec.nps is not None and spec.nps.weights is not None:
        raise ValueError("nps: weights: a merge takes each input's (finetuned[i].nps_weights)")
    given = [i for i in pruned_by_nps if inputs[i].nps_weights is not None]
    if given and len(given) != len(pruned_by_nps):
        missing = next(i for i in pruned_by_nps if i not in given)
        raise ValueError(
            f"finetuned: [{missing}] nps_weights: give every nps input its weights (to "
            "publish them) or none (to search them)"
        )
    for i in given:
        sparsity = spec.input_sparsity(inputs[i])
        bands = len(band_edges(sparsity, spec.nps_settings)) - 1
        if len(inputs[i].nps_weights or []) != bands:
            raise ValueError(
                f"finetuned: [{i}] nps_weights: {len(inputs[i].nps_weights or [])} given, "
                f"the bands at sparsity {sparsity:g} are {bands}"
            )
    if not given and spec.evaluate is None:
        raise ValueError(
            'evaluate: method "nps" on a merge searches band weights on your data: give '
            "evaluate {general} and a task on each input (or finetuned[i].nps_weights)"
        )
