"""An evaluated merge through the REST API and a real worker: sparsity "auto" on two fine-tunes,
each with its own task set, publishes its choice and returns the per-task numbers; an input's
task set outside the tenant's roots is a 422 naming it."""

from __future__ import annotations

import pytest

from tests.eval_models import build_eval_case
from tests.evaluation.merge_case import MergeCase, build_merge_case
from tests.evaluation.test_merge_eval import merge_body
from tests.service.conftest import client
from tests.service.test_worker_jobs import Jobs
from worker.evaluation.search import evaluations_per_method


@pytest.fixture(scope="module")
def case(local_root) -> MergeCase:
    return build_merge_case(build_eval_case(local_root / "eval_case"), local_root / "merge_case")


def test_an_auto_merge_through_the_api(service, case, local_root):
    jobs = Jobs(service)
    out = local_root / "merge-eval-auto"
    body = merge_body(case, out, sparsity="auto", target={"min_skill_kept": 0.45})
    record = jobs.wait(jobs.submit(body), timeout=240)
    assert record.status == "succeeded", record.error
    evaluation = record.result.report["evaluation"]
    assert len(evaluation["points"]) == evaluations_per_method()
    chosen = evaluation["chosen"]
    assert chosen["skill_kept"] >= 0.45
    assert [t["task"] for t in chosen["tasks"]] == [str(t) for t in case.tasks]
    assert set(evaluation["references"]) == {"base", "finetuned", "finetuned[0]", "finetuned[1]"}
    assert jobs.report(record.id)["spec"]["sparsity"] == chosen["sparsity"]
    assert (out / "evaluation.png").read_bytes()[:4] == b"\x89PNG"


def test_an_inputs_task_set_outside_the_roots_is_refused(service, case, local_root):
    with client(service) as api:
        body = merge_body(case, local_root / "merge-eval-x", sparsity=0.5)
        body["finetuned"][1]["task"] = "/etc/passwd.jsonl"
        response = api.post("/v1/jobs", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["field"] == "finetuned[1].task"
