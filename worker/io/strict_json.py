"""Strict RFC 8259 JSON out: the one way the service writes or serves JSON.

Python's `json.dumps` writes `NaN`, `Infinity` and `-Infinity` for non-finite floats (a candidate
whose perplexity overflowed, a ratio of infinities): that is not JSON, and strict parsers
(JavaScript's `JSON.parse`, Go's encoding/json, jq) reject the whole document. Here every
non-finite float becomes `null`, the places it was are collected (for a report's note), and
`allow_nan=False` makes any that slipped through an error instead of invalid output.

Imports only the standard library: the API (which never imports torch) uses it too.
"""

from __future__ import annotations

import json
import math
from typing import Any

# A report's note names at most this many places; the rest are counted.
_NOTED_PLACES = 20


def finite(value: Any) -> tuple[Any, list[str]]:
    """`value` with every non-finite float (NaN, +-inf) inside dicts and lists replaced by None,
    and the places replaced (`tensors[3].l1_kept_ratio`, `$` for the value itself). The input is
    not modified; containers are copied only where something changed."""
    places: list[str] = []
    return _finite(value, "", places), places


def _finite(value: Any, place: str, places: list[str]) -> Any:
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        places.append(place or "$")
        return None
    if isinstance(value, dict):
        items = {key: _finite(item, _member(place, key), places) for key, item in value.items()}
        return items if any(items[k] is not value[k] for k in value) else value
    if isinstance(value, list | tuple):
        items = [_finite(item, f"{place}[{i}]", places) for i, item in enumerate(value)]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    return value


def _member(place: str, key: object) -> str:
    return f"{place}.{key}" if place else str(key)


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps(value, **kwargs)` as strict JSON: non-finite floats written as null."""
    return json.dumps(finite(value)[0], allow_nan=False, **kwargs)


def with_finite_note(report: dict[str, Any]) -> dict[str, Any]:
    """A report (a JSON object) with non-finite floats as None and, where there were any, a line
    in its `notes` list naming where (so a reader knows a null there was not a measurement)."""
    clean, places = finite(report)
    if not places:
        return report
    shown = ", ".join(places[:_NOTED_PLACES])
    more = f" and {len(places) - _NOTED_PLACES} more" if len(places) > _NOTED_PLACES else ""
    note = (
        f"non-finite numbers (NaN or Infinity, which JSON cannot hold) are written as null: "
        f"{shown}{more}"
    )
    notes = clean.get("notes")
    clean = {**clean, "notes": [*notes, note] if isinstance(notes, list) else [note]}
    return clean
