"""NPS jobs on the trained tiny pair (tests/eval_models.py): at a sparsity where magnitude loses
most of the skill, the search finds band weights that keep more, publishes exactly the model its
reported weights define, twice the same, and runs on skill alone without a general set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.evaluation.test_auto import spec_for
from worker.cli import main
from worker.engine.pipeline import run_prune
from worker.evaluation.job import run_job_spec
from worker.evaluation.search import COARSE, evaluations_per_method
from worker.spec import JobSpec

# Magnitude keeps half the skill at 0.7 and none at 0.85 on this pair (24 examples).
SPARSITY = 0.8


def strict(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"not RFC 8259 JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def nps_job(case, out: Path, **nps) -> JobSpec:
    settings = {"generations": 3, "objective": "skill", "seed": 0, **nps}
    return spec_for(case, out, method="nps", sparsity=SPARSITY, nps=settings)


@pytest.fixture(scope="module")
def searched(eval_case, tmp_path_factory) -> tuple[Path, dict]:
    """One search through the CLI, as a user runs it."""
    out = tmp_path_factory.mktemp("nps") / "out"
    argv = ["prune", "--base", str(eval_case.base), "--finetuned", str(eval_case.finetuned),
            "--out", str(out), "--method", "nps", "--sparsity", str(SPARSITY),
            "--task", str(eval_case.task), "--general", str(eval_case.general),
            "--max-examples", "24", "--generations", "3", "--objective", "skill",
            "--nps-seed", "0"]  # fmt: skip
    assert main(argv) == 0
    return out, strict((out / "pruning_report.json").read_text())


def test_the_search_keeps_more_skill_than_magnitude_at_the_same_sparsity(searched):
    _out, report = searched
    nps = report["evaluation"]["nps"]
    magnitude, chosen = report["evaluation"]["points"]
    assert magnitude["method"] == "magnitude" and chosen["method"] == "nps"
    assert magnitude["sparsity"] == chosen["sparsity"] == SPARSITY
    # It starts from magnitude (the all-ones candidate), so it is never worse ...
    assert nps["evaluated"][0]["weights"] == [1.0] * nps["bands"]
    assert nps["fitness"] >= nps["magnitude_fitness"]
    # ... and on this pair it is better: the improvement, in task accuracy.
    improvement = chosen["skill"] - magnitude["skill"]
    print(f"NPS at sparsity {SPARSITY}: skill {magnitude['skill']:.3f} -> {chosen['skill']:.3f}")
    assert improvement > 0 and nps["improvement"] == pytest.approx(
        nps["fitness"] - nps["magnitude_fitness"]
    )
    population = 4 + math.floor(3 * math.log(nps["bands"]))
    assert nps["evaluations"] == 1 + 3 * population == len(nps["evaluated"])
    assert report["evaluation"]["evaluations"] == nps["evaluations"] + 2
    assert [g["index"] for g in nps["generations"]] == [0, 1, 2, 3]


def test_the_published_model_is_the_one_the_reported_weights_define(searched, eval_case, tmp_path):
    out, report = searched
    nps = report["evaluation"]["nps"]
    assert report["spec"]["method"] == "nps"
    assert report["spec"]["nps"]["weights"] == nps["weights"]
    again = tmp_path / "again"
    run_prune(
        JobSpec(
            base=str(eval_case.base),
            finetuned=str(eval_case.finetuned),
            output=str(again),
            method="nps",
            sparsity=SPARSITY,
            nps={"weights": nps["weights"], "lam": nps["lam"]},
        )
    )
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_the_plots_and_the_card_say_what_was_searched(searched):
    out, report = searched
    assert report["evaluation"]["plots"] == [
        "evaluation.png",
        "evaluation.svg",
        "nps_search.png",
        "nps_search.svg",
    ]
    assert (out / "nps_search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert "searched by NPS" in card and "objective **skill**" in card
    assert str(report["evaluation"]["requested"]["evaluate"]["task"]) in card


def test_the_same_job_twice_gives_the_same_weights_and_bytes(eval_case, tmp_path):
    runs = []
    for name in ("one", "two"):
        result = run_job_spec(nps_job(eval_case, tmp_path / name, generations=1))
        runs.append(result.report["evaluation"]["nps"])
    assert runs[0]["evaluated"] == runs[1]["evaluated"]
    assert runs[0]["weights"] == runs[1]["weights"]
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (
        tmp_path / "two" / "model.safetensors"
    ).read_bytes(), sorted(n for n in one if not one[n].equal(two[n]))


def test_skill_alone_runs_without_a_general_set(eval_case, tmp_path):
    spec = JobSpec.model_validate(
        {
            **nps_job(eval_case, tmp_path / "skill", generations=1).model_dump(),
            "evaluate": {"task": str(eval_case.task), "max_examples": 24},
        }
    )
    run_job_spec(spec)
    report = strict((tmp_path / "skill" / "pruning_report.json").read_text())
    evaluation = report["evaluation"]
    assert evaluation["references"]["base"]["perplexity"] is None  # not measured: null
    assert "no general set" in evaluation["note"]
    assert evaluation["nps"]["fitness"] >= evaluation["nps"]["magnitude_fitness"]


def test_max_evaluations_stops_early_with_the_best_so_far(eval_case, tmp_path):
    result = run_job_spec(nps_job(eval_case, tmp_path / "short", max_evaluations=4))
    nps = result.report["evaluation"]["nps"]
    assert nps["evaluations"] == 4 and nps["stopped"] == "max_evaluations"
    assert nps["fitness"] == max(e["fitness"] for e in nps["evaluated"])


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"method": "nps"}, "evaluate"),  # a search needs data
        (
            {"method": "nps", "nps": {"objective": "balanced"}, "evaluate": {"task": "/t.jsonl"}},
            "general",
        ),
        ({"method": "nps", "nps": {"weights": [1.0, 1.0]}}, "weights"),  # 8 bands at 0.9
        ({"method": "nps", "scope": "row", "nps": {"weights": [1.0] * 8}}, "scope"),
        ({"method": "magnitude", "nps": {}}, "nps"),
        ({"method": "nps", "nps": {"band_edges": [0, 0.5, 0.4, 1]}}, "band_edges"),
        ({"method": "nps", "nps": {"bounds": [2, 1]}}, "bounds"),
    ],
)
def test_nps_settings_that_cannot_run_are_refused_up_front(extra, field):
    with pytest.raises(ValueError, match=field):
        JobSpec.model_validate({"base": "/b", "finetuned": "/f", "output": "/o", **extra})


def test_auto_with_nps_searches_weights_where_magnitudes_order_loses_the_floor(eval_case, tmp_path):
    out = tmp_path / "auto"
    spec = spec_for(
        eval_case,
        out,
        sparsity="auto",
        methods=["magnitude", "nps"],
        target={"min_skill_kept": 0.9},
        nps={"generations": 2, "objective": "skill"},
    )
    report = strict(json.dumps(run_job_spec(spec).report))
    evaluation = report["evaluation"]
    ones = [p for p in evaluation["points"] if p["method"] == "nps"][: len(COARSE) + 3]
    magnitude = [p for p in evaluation["points"] if p["method"] == "magnitude"]
    # The all-ones order is magnitude's: the same skill at every sparsity both evaluated.
    assert [(p["sparsity"], p["skill"]) for p in ones] == [
        (p["sparsity"], p["skill"]) for p in magnitude
    ]
    nps = evaluation["nps"]
    edge = min(p["sparsity"] for p in ones if not p["meets_floor"] and p["sparsity"] > max(
        q["sparsity"] for q in ones if q["meets_floor"]))  # fmt: skip
    assert nps["sparsity"] == edge
    assert all(e["fitness"] is None or e["skill_kept"] >= 0.9 for e in nps["evaluated"])
    chosen = evaluation["chosen"]
    assert chosen["meets_floor"]
    assert evaluation["evaluations"] == 2 + 2 * evaluations_per_method() + nps["evaluations"]
    if chosen["method"] == "nps":  # published with exactly the weights of its candidate
        assert report["spec"]["nps"]["weights"] in (nps["weights"], [1.0] * nps["bands"])


def test_a_search_in_scope_model_publishes_its_reported_weights(eval_case, tmp_path):
    spec = spec_for(eval_case, tmp_path / "model", method="nps", sparsity=SPARSITY, scope="model",
                    nps={"generations": 1, "population": 4, "objective": "skill"})  # fmt: skip
    report = run_job_spec(spec).report
    nps = report["evaluation"]["nps"]
    assert report["spec"]["scope"] == "model" and nps["evaluations"] == 5
    again = tmp_path / "again"
    run_prune(
        JobSpec(base=str(eval_case.base), finetuned=str(eval_case.finetuned), output=str(again),
                method="nps", sparsity=SPARSITY, scope="model", nps={"weights": nps["weights"]})
    )  # fmt: skip
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == (
        again / "model.safetensors"
    ).read_bytes()
