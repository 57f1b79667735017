"""The model card (README.md) of a merge: the rule, and each input with its pruning."""

from __future__ import annotations

import json

from worker.engine.card import hub_id
from worker.engine.merge_methods import CombineRule
from worker.spec import JobSpec


def merge_card(
    spec: JobSpec,
    rule: CombineRule,
    merge: dict,
    totals: dict,
    inputs: dict,
    notes: list[str],
) -> str:
    paper = f"[{rule.title}]({rule.paper_url})" if rule.paper_url else rule.title
    front = [
        "---",
        f"base_model: {json.dumps(hub_id(spec.base or ''))}",
        "library_name: transformers",
        "tags:",
        "- fapm-service",
        "- merge",
        "- task-vector",
        f"- {rule.name}",
        "---",
    ]
    rows = []
    for i, (one, identity) in enumerate(
        zip(merge["inputs"], inputs.get("models", []), strict=False)
    ):
        revision = f" @ `{identity['revision']}`" if identity.get("revision") else ""
        kind = f"{identity.get('adapter_type', 'LoRA')} adapter" if one["adapter"] else "fine-tune"
        kept = one["totals"]
        rows.append(
            f"| {i} | `{one['model']}`{revision} ({kind}) | {one['weight']:g} | `{one['method']}` "
            f"| {one['sparsity']:g} | {kept.get('kept', 0)} / {kept.get('n', 0)} |\n"
        )
    note_lines = "".join(f"- {note}\n" for note in notes)
    body = f"""
# Merge of {len(merge["inputs"])} fine-tunes of {hub_id(spec.base or "")}

Each fine-tune's task vector (finetuned - base) was pruned by its own method and sparsity, then
the pruned task vectors were combined over the base by **{paper}** (`{rule.name}`, lambda
{merge["lam"]:g}, normalize {str(merge["normalize"]).lower()}). Built by fapm-service.

| input | model | weight | method | sparsity | kept / total entries |
| --- | --- | --- | --- | --- | --- |
{"".join(rows)}
Base model: `{spec.base}`. Entries of the merged update that differ from zero:
{totals.get("nonzero_delta", 0)} of {totals.get("n", 0)}. Per-tensor and per-input counts are in
`pruning_report.json`.
{f"{chr(10)}## Notes{chr(10)}{chr(10)}{note_lines}" if note_lines else ""}
## Job specification

```json
{spec.model_dump_json(indent=2)}
```
"""
    return "\n".join(front) + "\n" + body
