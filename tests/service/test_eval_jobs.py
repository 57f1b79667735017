"""Evaluated jobs through the REST API, a real redis-server and a Celery worker: sparsity "auto"
publishes its choice with the plot and returns every point in the job result; an unreachable
floor fails with skill_floor_unreachable, publishes nothing and still returns its points; an
evaluation set outside the allowed roots is a 422 at submission."""

from __future__ import annotations

import json

import pytest

from tests.eval_models import EvalCase, build_eval_case
from tests.evaluation.added_vocab import EXTRA, build_added_vocab_case
from tests.models import load_state_dict
from tests.service.conftest import client
from tests.service.test_worker_jobs import Jobs
from worker.evaluation.search import evaluations_per_method


@pytest.fixture(scope="module")
def case(local_root) -> EvalCase:
    return build_eval_case(local_root / "eval_case")


def body(case: EvalCase, output, **extra) -> dict:
    return {
        "base": str(case.base),
        "finetuned": str(case.finetuned),
        "output": str(output),
        "sparsity": "auto",
        "evaluate": {"task": str(case.task), "general": str(case.general), "max_examples": 24},
        **extra,
    }


def test_auto_job_through_the_api(service, case, local_root):
    jobs = Jobs(service)
    out = local_root / "eval-out-auto"
    job_id = jobs.submit(body(case, out, methods=["magnitude"], target={"min_skill_kept": 0.9}))
    seen: list = []
    record = jobs.wait(job_id, timeout=180, seen=seen)
    assert record.status == "succeeded", record.error
    evaluation = record.result.report["evaluation"]
    assert len(evaluation["points"]) == evaluations_per_method()
    chosen = evaluation["chosen"]
    assert chosen["method"] == "magnitude" and chosen["skill_kept"] >= 0.9
    assert record.result.output == str(out)
    assert (out / "evaluation.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["evaluation"]["points"] == evaluation["points"]
    assert jobs.report(job_id)["spec"]["sparsity"] == chosen["sparsity"]
    # Progress went through the evaluation stage, and only ever grew.
    stages = [r.progress.stage for r in seen]
    assert "evaluate" in stages and stages.index("evaluate") < len(stages) - 1
    fractions = [r.progress.fraction for r in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_auto_job_with_added_vocabulary_through_the_api(service, case, local_root):
    """A fine-tune with added tokens, a task set that uses one (it used to end in
    internal_error): the job searches, publishes its choice with the added rows, and reports."""
    added = build_added_vocab_case(case, local_root / "eval-jobs-vocab")
    jobs = Jobs(service)
    out = local_root / "eval-out-vocab"
    spec = body(added, out, methods=["magnitude"], target={"min_skill_kept": 0.9})
    record = jobs.wait(jobs.submit(spec), timeout=180)
    assert record.status == "succeeded", record.error
    evaluation = record.result.report["evaluation"]
    assert evaluation["references"]["finetuned"]["skill"] == 1.0
    assert evaluation["chosen"]["skill_kept"] >= 0.9
    assert f"the {EXTRA} vocabulary rows it lacks" in evaluation["note"]
    published = load_state_dict(out)
    expected = load_state_dict(added.finetuned)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # the added rows are copied
        assert published[name].shape == expected[name].shape
        assert published[name][-EXTRA:].equal(expected[name][-EXTRA:])


def test_unreachable_floor_through_the_api(service, case, local_root):
    jobs = Jobs(service)
    out = local_root / "eval-out-never"
    spec = body(case, out, methods=["breadcrumbs"], target={"min_skill_kept": 1.0})
    record = jobs.wait(jobs.submit(spec), timeout=180)
    assert record.status == "failed"
    assert record.error.code == "skill_floor_unreachable"
    assert record.result.output is None
    points = record.result.report["evaluation"]["points"]
    assert len(points) == evaluations_per_method()
    assert not any(p["meets_floor"] for p in points)
    assert not out.exists()


def test_evaluation_sets_outside_the_roots_are_refused_at_submission(service, case, local_root):
    with client(service) as api:
        spec = body(case, local_root / "x")
        spec["evaluate"]["task"] = "/etc/passwd.jsonl"
        response = api.post("/v1/jobs", json=spec)
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["field"] == "evaluate.task"
        missing = api.post("/v1/jobs", json={**body(case, local_root / "y"), "evaluate": None})
        assert missing.status_code == 422
        assert "evaluate" in missing.text


def test_nps_job_through_the_api(service, case, local_root):
    jobs = Jobs(service)
    out = local_root / "eval-out-nps"
    nps = {"generations": 1, "population": 4, "objective": "balanced", "seed": 0}
    seen: list = []
    record = jobs.wait(
        jobs.submit(body(case, out, method="nps", sparsity=0.8, nps=nps)), timeout=180, seen=seen
    )
    assert record.status == "succeeded", record.error
    search = record.result.report["evaluation"]["nps"]
    assert search["evaluations"] == 1 + 4 and search["fitness"] >= search["magnitude_fitness"]
    assert jobs.report(record.id)["spec"]["nps"]["weights"] == search["weights"]
    assert (out / "nps_search.png").exists()
    # Progress counted each evaluation: 2 references + 5 candidates.
    totals = {r.progress.tensors_total for r in seen if r.progress.stage == "evaluate"}
    assert totals == {7}


def test_nps_without_its_sets_is_a_422_problem(service, case, local_root):
    with client(service) as api:
        no_sets = {**body(case, local_root / "n1", method="nps", sparsity=0.8), "evaluate": None}
        response = api.post("/v1/jobs", json=no_sets)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "evaluate" in response.text and "nps" in response.text
        balanced = body(case, local_root / "n2", method="nps", sparsity=0.8)
        del balanced["evaluate"]["general"]
        response = api.post("/v1/jobs", json=balanced)
        assert response.status_code == 422 and "general" in response.text
