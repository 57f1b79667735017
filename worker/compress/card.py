"""The model card of a weight-pruned model: what was pruned, how, with which data, and (when the
job evaluated) what it kept."""

from __future__ import annotations

import json

from worker.engine.card import hub_id
from worker.spec import JobSpec

PAPERS = {
    "wanda": "[Wanda](https://arxiv.org/abs/2306.11695)",
    "sparsegpt": "[SparseGPT](https://arxiv.org/abs/2301.00774)",
    "magnitude": "magnitude",
}
TASK_AWARE = "[task-aware calibration](https://arxiv.org/abs/2510.22489)"


def weights_card(
    spec: JobSpec,
    totals: dict,
    inputs: dict,
    calibration: dict,
    evaluation: dict | None,
) -> str:
    assert spec.model is not None
    method = PAPERS.get(spec.method, spec.method)
    if calibration.get("mode") == "taskaware":
        method += f" with {TASK_AWARE}"
    pattern = f", pattern {spec.pattern}" if spec.pattern else ""
    lines = [
        "---",
        f"base_model: {json.dumps(hub_id(spec.model))}",
        "library_name: transformers",
        "tags:",
        "- fapm-service",
        "- pruning",
        "- sparse",
        f"- {spec.method}",
        "---",
        "",
        f"# {hub_id(spec.model)}, {spec.sparsity:.0%} sparse",
        "",
        f"The weights of `{spec.model}`'s decoder layers (attention and MLP projections) were "
        f"pruned by **{method}** at sparsity {spec.sparsity:g}{pattern}. Embeddings, norms and "
        "the head are unchanged. The checkpoint is dense: pruned weights are stored as zeros.",
        "",
        "| | |",
        "| --- | --- |",
        f"| model | `{spec.model}` |",
        f"| pruned weights | {totals['n'] - totals['kept']} of {totals['n']} "
        f"({totals['sparsity']:.4f}) |",
    ]
    revision = inputs.get("model", {}).get("revision")
    if revision:
        lines.append(f"| revision | `{revision}` |")
    if spec.calibration is not None:
        sets = calibration.get("sets", {})
        for source, uri in (("general", spec.calibration.general), ("task", spec.calibration.task)):
            if source in sets:
                counts = sets[source]
                lines.append(
                    f"| {source} calibration | `{uri}`: {counts['sequences']} sequences, "
                    f"{counts['tokens']} tokens |"
                )
        lines.append(f"| calibration mode | {spec.calibration.mode} |")
    if evaluation is not None:
        point = evaluation["points"][0]
        unpruned = evaluation["references"]["base"]

        def fmt(value) -> str:
            return "undefined" if value is None else f"{value:.4f}"

        lines += [
            "",
            "## Evaluation",
            "",
            f"Measured by fapm-service on `{spec.evaluate.task}` (skill: exact match of the greedy "  # type: ignore[union-attr]
            f"completion) and `{spec.evaluate.general}` (perplexity), against the unpruned model.",  # type: ignore[union-attr]
            "",
            "| model | skill | skill kept | perplexity |",
            "| --- | --- | --- | --- |",
            f"| unpruned | {fmt(unpruned['skill'])} | 1 | {fmt(unpruned['perplexity'])} |",
            f"| pruned | {fmt(point['skill'])} | {fmt(point['skill_kept'])} | "
            f"{fmt(point['perplexity'])} |",
        ]
    return "\n".join(lines) + "\n"
