"""GET /v1/jobs with a cursor whose job is unknown (expired, or made up): the page still holds
exactly the jobs with smaller ids, and the scan reads no record of a job at or above the cursor
(the index scan starts near the cursor's own time), against a real redis-server and the API."""

from __future__ import annotations

import secrets

from app.jobs.store import JobStore
from tests.service.conftest import client

BASE_MS = 1_000_000_000_000  # 2001: below every real job of the session


def _job_at(store: JobStore, tenant: str, ms: int, labels: dict[str, str]) -> str:
    """A job whose id carries millisecond `ms`, indexed as if written then; ended, so it holds
    no quota slot."""
    job_id = f"{ms:012x}{secrets.token_hex(10)}"
    outcome = store.create(
        job_id=job_id,
        tenant=tenant,
        queue="cpu",
        spec_json={"base": "/b", "finetuned": "/f", "output": "/o"},
        labels=labels,
        webhook_url=None,
        webhook_secret=None,
        max_active=1000,
    )
    assert outcome.kind == "created"
    store.redis.zadd(f"fapm:tenant:{tenant}:jobs", {job_id: ms}, xx=True)
    assert store.request_cancel(job_id) == "cancelled"
    return job_id


def _calls(store: JobStore, command: str) -> int:
    return store.redis.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_an_unknown_cursor_reads_no_newer_job(api_stack):
    store = JobStore.from_url(api_stack.redis_url)
    tenant = f"cursor-{secrets.token_hex(4)}"
    old = [_job_at(store, tenant, BASE_MS + i, {}) for i in range(2)]
    cursor_ms = BASE_MS + 50_000
    # Newer than the cursor: some within a minute of it (read by the index scan, never
    # fetched), most long after (not even scanned).
    near = [_job_at(store, tenant, cursor_ms + 10 + i, {}) for i in range(100)]
    far = [_job_at(store, tenant, cursor_ms + 3_600_000 + i, {}) for i in range(200)]
    forged = f"{cursor_ms:012x}" + "0" * 20

    # An independent reference: every job with a smaller id, newest first.
    expected = sorted((j for j in old + near + far if j < forged), reverse=True)
    assert expected == old[::-1]

    store.redis.config_resetstat()
    page, next_cursor = store.list(tenant, limit=10, cursor=forged)
    assert [r.id for r in page] == expected and next_cursor is None
    assert _calls(store, "hgetall") == len(old)  # only the jobs listed were read

    # A short cursor bounds as its padded prefix; one below every id lists nothing.
    assert [r.id for r in store.list(tenant, limit=500, cursor="f")[0]] == sorted(
        old + near + far, reverse=True
    )
    assert store.list(tenant, limit=10, cursor="0")[0] == []


def test_an_unknown_cursor_pages_over_http_and_a_malformed_one_is_a_problem(api_stack):
    store = JobStore.from_url(api_stack.redis_url)
    run = secrets.token_hex(4)
    labels = {"review-cursor": run}
    old = [_job_at(store, "bob", BASE_MS + 7_000 + i, labels) for i in range(3)]
    _job_at(store, "bob", BASE_MS + 9_000, labels)  # newer than the cursor
    forged = f"{BASE_MS + 8_000:012x}"  # not a job id, but hex: a place in time
    with client(api_stack, tenant="bob") as http:
        seen, cursor = [], forged
        while cursor:
            response = http.get(
                "/v1/jobs", params={"label": f"review-cursor={run}", "limit": 2, "cursor": cursor}
            )
            assert response.status_code == 200, response.text
            seen += [job["id"] for job in response.json()["jobs"]]
            cursor = response.json()["next_cursor"]
        assert seen == old[::-1]
        bad = http.get("/v1/jobs", params={"cursor": "not-a-job-id"})
        assert bad.status_code == 422
        assert bad.headers["content-type"].startswith("application/problem+json")
        assert bad.json()["code"] == "validation_error"
