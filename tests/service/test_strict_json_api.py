"""What the API serves is strict RFC 8259 JSON even when a report held NaN/Infinity: the store
writes non-finite numbers as null, and a report stored before that (raw `NaN` in Redis) is served
with nulls and a note, never a 500. Real redis-server and uvicorn (api_stack)."""

from __future__ import annotations

import json
import math

from app.jobs.store import JobStore, new_job_id
from tests.service.conftest import client
from tests.unit.test_strict_json import strict_loads

REPORT = {
    "format": "fapm-pruning-report/1",
    "totals": {"density": 0.1},
    "evaluation": {"points": [{"sparsity": 0.9, "perplexity": math.inf, "skill_kept": math.nan}]},
}


def _finished_job(store: JobStore) -> str:
    job_id = new_job_id()
    outcome = store.create(
        job_id=job_id,
        tenant="alice",
        queue="cpu",
        spec_json={"base": "/b", "finetuned": "/f", "output": "/o"},
        labels={},
        webhook_url=None,
        webhook_secret=None,
        max_active=100,
    )
    assert outcome.kind == "created"
    summary = {"output": "/o", "report": {"totals": {"l1_kept_ratio": math.nan}}}
    assert store.finish(job_id, "succeeded", result=summary, report=REPORT)
    return job_id


def test_a_report_with_non_finite_numbers_is_stored_and_served_as_strict_json(api_stack):
    store = JobStore.from_url(api_stack.redis_url)
    job_id = _finished_job(store)
    strict_loads(store.redis.get(f"fapm:job:{job_id}:report"))  # stored strict: no NaN
    with client(api_stack) as api:
        response = api.get(f"/v1/jobs/{job_id}/report")
        assert response.status_code == 200, response.text
        report = strict_loads(response.text)
        assert report["evaluation"]["points"][0]["perplexity"] is None
        assert report["evaluation"]["points"][0]["skill_kept"] is None
        record = api.get(f"/v1/jobs/{job_id}")
        assert record.status_code == 200, record.text
        assert strict_loads(record.text)["result"]["report"]["totals"]["l1_kept_ratio"] is None


def test_a_report_stored_with_nan_before_is_served_with_nulls_and_a_note(api_stack):
    store = JobStore.from_url(api_stack.redis_url)
    job_id = _finished_job(store)
    # As the previous writer stored it: Python's json.dumps writes NaN and Infinity.
    store.redis.set(f"fapm:job:{job_id}:report", json.dumps(REPORT))
    with client(api_stack) as api:
        response = api.get(f"/v1/jobs/{job_id}/report")
    assert response.status_code == 200, response.text  # was a 500: JSONResponse refuses NaN
    report = strict_loads(response.text)
    assert report["evaluation"]["points"][0] == {
        "sparsity": 0.9,
        "perplexity": None,
        "skill_kept": None,
    }
    assert any("evaluation.points[0].perplexity" in note for note in report["notes"])
