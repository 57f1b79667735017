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


def _create_hooked(store: JobStore, tenant: str) -> str:
    job_id = new_job_id()
    outcome = store.create(
        job_id=job_id,
        tenant=tenant,
        queue="cpu",
        spec_json={"base": "/b", "finetuned": "/f", "output": "/o"},
        labels={},
        webhook_url="http://127.0.0.1:9/hook",
        webhook_secret=None,
        max_active=10,
    )
    assert outcome.kind == "created"
    return job_id


def test_a_job_that_ends_with_a_webhook_owes_it_until_it_is_queued(api_stack):
    """finish and cancel record the owed webhook in the same script as the status, so no death
    in between loses it; the sweeper's claim re-stamps (one sweeper per grace); queueing it
    clears it."""
    store = JobStore.from_url(api_stack.redis_url)
    tenant = f"owed-{new_job_id()[-6:]}"
    done, cancelled = _create_hooked(store, tenant), _create_hooked(store, tenant)
    plain = _create(store, tenant)  # no webhook
    before = int(time.time() * 1000)
    assert store.finish(done, "succeeded", result={"output": "/o", "report": {}})
    assert store.request_cancel(cancelled) == "cancelled"
    assert store.finish(plain, "failed", error={"code": "x", "message": "y"})
    owed = store.redis.zrange("fapm:webhooks-owed", 0, -1, withscores=True)
    mine = {job_id: score for job_id, score in owed if job_id in (done, cancelled, plain)}
    assert set(mine) == {done, cancelled}  # a job without a webhook owes none
    assert all(before <= score <= time.time() * 1000 for score in mine.values())

    claimed = store.owed_webhooks_before(int(time.time() * 1000))
    assert {done, cancelled} <= set(claimed)
    # Re-stamped: a second sweeper within the grace does not take them again.
    assert not {done, cancelled} & set(store.owed_webhooks_before(before - 1))
    # Queued: still owed, stamped to when its delivery should show progress; ended: cleared.
    store.webhook_expected_by(done, time.time() + 60, dispatched=True)
    assert store.webhook_dispatched(done)
    assert done not in store.owed_webhooks_before(int(time.time() * 1000))
    store.webhook_settled(done)
    assert store.redis.zscore("fapm:webhooks-owed", done) is None
    assert store.redis.zscore("fapm:webhooks-owed", cancelled) is not None
    store.webhook_settled(cancelled)
    store.webhook_expected_by(cancelled, time.time())  # an ended webhook is not owed again
    assert store.redis.zscore("fapm:webhooks-owed", cancelled) is None


def test_an_orphan_is_claimed_once_until_its_message_is_taken(api_stack):
    """claim_orphans returns a running job with no lease once: not again while the claim holds
    or once it is marked re-enqueued, and again only after a worker took it (note_running) and
    it was orphaned anew."""
    store = JobStore.from_url(api_stack.redis_url)
    job_id = _create(store, f"orphan-{new_job_id()[-6:]}")
    store.note_running(job_id)
    lease = store.start(job_id, lease_seconds=0.05)
    assert not isinstance(lease, str)
    time.sleep(0.1)
    later = time.time() + 1

    def claimed(hold: float = 3600) -> list:
        orphans = store.claim_orphans(later, claim_seconds=60, requeue_hold_seconds=hold)
        return [o for o in orphans if o.job_id == job_id]

    (orphan,) = claimed()
    assert not claimed()  # the claim holds
    store.redis.delete(f"fapm:requeue-claim:{job_id}")  # as if the claim lapsed
    store.mark_requeued(orphan)
    assert store.is_requeued(job_id)
    assert not claimed()  # its message waits on the queue
    assert (
        len(claimed(hold=-5)) == 1
    )  # ... unless it was re-enqueued longer ago than the hold (lost)
    store.redis.delete(f"fapm:requeue-claim:{job_id}")
    store.note_running(job_id)  # a worker took it ...
    assert not store.is_requeued(job_id)
    store.redis.delete(f"fapm:requeue-claim:{job_id}")
    (again,) = claimed()  # ... and died without a lease
    store.note_running(job_id)  # taken again before the sweeper marked it: left unmarked
    store.mark_requeued(again)
    assert not store.is_requeued(job_id)
    store.redis.zadd("fapm:requeued", {job_id: time.time()})
    store.finish(job_id, "failed", error={"code": "x", "message": "y"})
    assert not claimed() and store.noted_running_at(job_id) is None  # finished: forgotten
    assert not store.is_requeued(job_id)  # ... by the re-enqueue marks too
