"""prune "weights" jobs through the REST API, a real redis-server and a Celery worker: a task-aware
Wanda job with evaluate publishes a dense model, reports per-layer sparsity and its evaluation
against the unpruned model, with progress through its stages; a pattern that does not match the
sparsity and a missing calibration set are 422 problems at submission."""

from __future__ import annotations

import json

import pytest

from tests.eval_models import EvalCase
from tests.service.conftest import client
from tests.service.test_worker_jobs import Jobs
from tests.weights_models import build_dual_skill_case


@pytest.fixture(scope="module")
def case(local_root) -> EvalCase:
    return build_dual_skill_case(local_root / "dual_case")


def body(case: EvalCase, output, **extra) -> dict:
    return {
        "prune": "weights",
        "model": str(case.finetuned),
        "output": str(output),
        "method": "wanda",
        "sparsity": 0.5,
        "calibration": {
            "mode": "taskaware",
            "general": str(case.general),
            "task": str(case.task),
            "max_examples": 16,
        },
        **extra,
    }


def test_weights_job_through_the_api(service, case, local_root):
    jobs = Jobs(service)
    out = local_root / "weights-out"
    evaluate = {"task": str(case.task), "general": str(case.general), "max_examples": 24}
    seen: list = []
    record = jobs.wait(jobs.submit(body(case, out, evaluate=evaluate)), timeout=240, seen=seen)
    assert record.status == "succeeded", record.error
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["operation"] == "weights"
    assert [r["index"] for r in report["layers"]] == [0, 1]
    assert all(abs(x["sparsity"] - 0.5) < 1e-9 for r in report["layers"] for x in r["linears"])
    point = record.result.report["evaluation"]["points"][0]
    assert 0 <= point["skill_kept"] <= 1.5 and point["perplexity"] > 1
    stages = [r.progress.stage for r in seen]
    assert "evaluate" in stages and stages[-1] == "done"  # (a 2-layer prune may pass between polls)
    fractions = [r.progress.fraction for r in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_weights_jobs_that_cannot_run_are_422_problems(service, case, local_root):
    with client(service) as api:
        response = api.post("/v1/jobs", json=body(case, local_root / "w1", pattern="2:4",
                                                  sparsity=0.6))  # fmt: skip
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "0.5" in response.text
        no_task = body(case, local_root / "w2")
        del no_task["calibration"]["task"]
        response = api.post("/v1/jobs", json=no_task)
        assert response.status_code == 422 and "task" in response.text
        outside = body(case, local_root / "w3")
        outside["calibration"]["general"] = "/etc/passwd.jsonl"
        response = api.post("/v1/jobs", json=outside)
        assert response.status_code == 422, response.text
