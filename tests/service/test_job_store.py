"""JobStore retention against a real redis-server: finished jobs expire, their index entries go."""

from __future__ import annotations

import time

from app.jobs.store import JobStore, events_key, job_key, new_job_id


def _create(store: JobStore, tenant: str) -> str:
    time.sleep(0.002)  # ids sort by creation millisecond; within one, the order is arbitrary
    job_id = new_job_id()
    outcome = store.create(
        job_id=job_id,
        tenant=tenant,
        queue="cpu",
        spec_json={"base": "/b", "finetuned": "/f", "output": "/o"},
        labels={},
        webhook_url=None,
        webhook_secret=None,
        max_active=10,
    )
    assert outcome.kind == "created"
    return job_id


def test_finished_jobs_expire_and_leave_the_listing(api_stack):
    store = JobStore.from_url(api_stack.redis_url, job_ttl_seconds=3600)
    tenant = f"ttl-{new_job_id()[-6:]}"
    done, cancelled, running = (_create(store, tenant) for _ in range(3))
    assert store.finish(done, "succeeded", result={"output": "/o", "report": {}}, report={"x": 1})
    assert store.request_cancel(cancelled) == "cancelled"
    for job_id in (done, cancelled):
        for key in (job_key(job_id), events_key(job_id)):
            assert 0 < store.redis.ttl(key) <= 3600, key
    assert 0 < store.redis.ttl(f"fapm:job:{done}:report") <= 3600
    # Active jobs never expire.
    assert store.redis.ttl(job_key(running)) == -1
    # When a record has expired, listing drops its index entry (and pages stay whole).
    store.redis.delete(job_key(done))
    page, _ = store.list(tenant, limit=10)
    assert [r.id for r in page] == [running, cancelled]
    assert store.redis.zscore(f"fapm:tenant:{tenant}:jobs", done) is None
