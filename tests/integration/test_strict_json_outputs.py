"""Every JSON file a job writes is strict RFC 8259 JSON, even when its report holds a non-finite
number: a real prune on a tiny Llama pair whose evaluation section (the hook the evaluated job
uses to add it) has a candidate whose perplexity overflowed."""

from __future__ import annotations

import math
from pathlib import Path

from tests.unit.test_strict_json import strict_loads
from worker.engine.pipeline import run_prune
from worker.spec import JobSpec


def _overflowed_evaluation(directory: Path) -> dict:
    return {
        "evaluation": {
            "points": [
                {"sparsity": 0.5, "perplexity": 12.5, "skill_kept": 0.98},
                {"sparsity": 0.99, "perplexity": math.inf, "skill_kept": math.nan},
            ]
        }
    }


def test_every_json_file_of_an_output_is_strict_json_with_a_noted_null(bf16_pair, tmp_path):
    out = tmp_path / "out"
    spec = JobSpec(
        base=str(bf16_pair.base),
        finetuned=str(bf16_pair.finetuned),
        output=str(out),
        dtype="float32",  # config.json is rewritten, not copied
        shard_size="20KB",  # an index too
    )
    result = run_prune(spec, extra_files=_overflowed_evaluation)
    written = sorted(out.rglob("*.json"))
    names = {p.name for p in written}
    assert {"pruning_report.json", "config.json", "model.safetensors.index.json"} <= names
    for path in written:
        strict_loads(path.read_text())
    report = strict_loads((out / "pruning_report.json").read_text())
    point = report["evaluation"]["points"][1]
    assert point["perplexity"] is None and point["skill_kept"] is None
    assert any("evaluation.points[1].perplexity" in note for note in report["notes"])
    assert strict_loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    # What the worker stores for the API is the same strict report.
    assert result.report["evaluation"]["points"][1]["perplexity"] is None
    assert result.report["notes"] == report["notes"]
