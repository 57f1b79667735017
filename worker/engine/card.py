"""The model card (README.md) written with every output, in the Hub's format."""

from __future__ import annotations

import json

from worker.engine.methods import get_method
from worker.engine.name_pairing import IDENTITY, NameMap
from worker.io.uri import parse_uri
from worker.spec import JobSpec


def hub_id(uri: str) -> str:
    parsed = parse_uri(uri)
    return parsed.path if parsed.scheme == "hf" else uri


def _revision_rows(inputs: dict[str, dict]) -> str:
    """Table rows naming the commit each Hub input was resolved to (branches move; commits don't)."""
    rows = []
    for role, identity in inputs.items():
        if identity.get("revision"):
            rows.append(f"| {role} revision | `{identity['revision']}` |\n")
    return "".join(rows)


def _update_kind(spec: JobSpec, inputs: dict[str, dict]) -> str:
    """The update side's row label: the adapter's kind as its reader identified it (LoRA, DoRA)."""
    if not spec.adapter:
        return "fine-tuned model"
    return f"{(inputs.get('adapter') or {}).get('adapter_type', 'LoRA')} adapter"


def _pairing_section(name_map: NameMap, notes: list[str]) -> str:
    """How the fine-tune's tensors were paired with the base's, when it is not name for name."""
    if name_map.is_identity and not notes:
        return ""
    lines = "".join(f"- {note}\n" for note in notes)
    return f"\n## Tensor pairing\n\n{lines}"


# The sparse-delta paragraph sits between these marks, so materialize can drop it from the card
# of the dense model it rebuilds.
DELTA_NOTE_START, DELTA_NOTE_END = "<!-- fapm:sparse-delta -->", "<!-- /fapm:sparse-delta -->"


def without_delta_note(card: str) -> str:
    """The card with its sparse-delta paragraph (if any) removed."""
    start, end = card.find(DELTA_NOTE_START), card.find(DELTA_NOTE_END)
    if start == -1 or end == -1:
        return card
    return card[:start] + card[end + len(DELTA_NOTE_END) + 1 :]


def _delta_section(spec: JobSpec) -> str:
    if getattr(spec, "output_format", "dense") != "sparse-delta":
        return ""
    return f"""{DELTA_NOTE_START}
**This directory holds a sparse task vector, not a loadable model**: only the entries that differ
from the base, as a bitmask (or indices) and values per tensor (`fapm-delta.json` names the base
files and their sha256). Rebuild the dense model on the same base with
`fapm materialize --base {spec.base} --delta <this directory> --out <dir>`.
{DELTA_NOTE_END}
"""


def model_card(
    spec: JobSpec,
    totals: dict[str, float | int],
    inputs: dict[str, dict] | None = None,
    name_map: NameMap = IDENTITY,
    notes: list[str] | None = None,
) -> str:
    method = get_method(spec.method)
    paper = f"[{method.title}]({method.paper_url})" if method.paper_url else method.title
    update = spec.finetuned or spec.adapter
    front = [
        "---",
        f"base_model: {json.dumps(hub_id(spec.base))}",
        "library_name: transformers",
        "tags:",
        "- fapm-service",
        "- pruning",
        "- task-vector",
        f"- {spec.method}",
        "---",
    ]
    body = f"""
# Pruned fine-tune of {hub_id(update or "")}

This model is `base + mask * (finetuned - base)`: the fine-tuned model with part of its update
removed by **{paper}**, so it keeps the new skill and forgets less of what the base model knew.
Built by fapm-service.

| | |
| --- | --- |
| base model | `{spec.base}` |
| {_update_kind(spec, inputs or {})} | `{update}` |
{_revision_rows(inputs or {})}| method | `{spec.method}` |
| sparsity (update dropped) | {spec.sparsity:g} |
| density (update kept) | {spec.density:g} |
| selection scope | `{spec.scope}` |
| kept / total entries | {totals.get("kept", 0)} / {totals.get("n", 0)} |
| L2 of kept update / full update | {float(totals.get("l2_kept_ratio", 1.0)):.4f} |

Per-tensor counts are in `pruning_report.json`.
{_delta_section(spec)}{_pairing_section(name_map, notes or [])}
## Job specification

```json
{spec.model_dump_json(indent=2)}
```
"""
    return "\n".join(front) + "\n" + body
