"""The strict JSON helper: non-finite floats become null (noted in reports), never NaN/Infinity."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from worker.io.strict_json import dumps, finite, with_finite_note


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as RFC 8259 parsers do."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


REPORT = {
    "format": "fapm-pruning-report/1",
    "totals": {"density": 0.1, "l1_kept_ratio": math.nan},
    "evaluation": {
        "points": [
            {"sparsity": 0.5, "perplexity": 4.0},
            {"sparsity": 0.9, "perplexity": math.inf, "skill_kept": -math.inf},
        ]
    },
    "tensors": [("a", 1.5), ("b", math.nan)],
}


def test_plain_json_dumps_is_not_strict_json_which_is_why_the_helper_exists():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads(json.dumps(REPORT))


def test_non_finite_floats_become_null_and_their_places_are_named():
    text = dumps(REPORT, indent=2)
    parsed = strict_loads(text)
    assert parsed["totals"] == {"density": 0.1, "l1_kept_ratio": None}
    assert parsed["evaluation"]["points"][1] == {
        "sparsity": 0.9,
        "perplexity": None,
        "skill_kept": None,
    }
    assert parsed["evaluation"]["points"][0] == {"sparsity": 0.5, "perplexity": 4.0}
    assert parsed["tensors"] == [["a", 1.5], ["b", None]]
    _, places = finite(REPORT)
    assert places == [
        "totals.l1_kept_ratio",
        "evaluation.points[1].perplexity",
        "evaluation.points[1].skill_kept",
        "tensors[1][1]",
    ]
    assert math.isnan(REPORT["totals"]["l1_kept_ratio"])  # the input is left as it was


def test_a_report_gets_a_note_naming_each_null_and_keeps_its_other_notes():
    noted = with_finite_note({**REPORT, "notes": ["an earlier note"]})
    assert noted["notes"][0] == "an earlier note"
    assert "evaluation.points[1].perplexity" in noted["notes"][1]
    assert "null" in noted["notes"][1]
    strict_loads(dumps(noted))
    clean = {"format": "fapm-pruning-report/1", "totals": {"density": 0.5}}
    assert with_finite_note(clean) is clean  # nothing to note: no notes key added


def test_a_bare_non_finite_value_and_many_places():
    assert dumps(math.nan) == "null"
    assert finite(-math.inf) == (None, ["$"])
    noted = with_finite_note({"xs": [math.nan] * 25})
    assert noted["xs"] == [None] * 25
    assert noted["notes"][0].endswith("and 5 more")


def test_the_helper_imports_no_torch():
    # The API serves reports through it and must not import torch.
    code = "import sys, worker.io.strict_json; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
