"""One POST per webhook attempt however many delivery chains run: a chain the sweeper queued
while the first one's worker was alive but busy finds the attempt claimed and stops (against a
real redis-server and a real HTTP receiver on 127.0.0.1)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.core.config import Settings
from app.jobs.store import JobStore, new_job_id
from worker.webhooks import deliver, webhook_id_for


class GatedReceiver:
    """Answers 200; the first POST is held until `gate` is set (a slow receiver)."""

    def __init__(self) -> None:
        self.posts: list[float] = []
        self.gate = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                receiver.posts.append(time.time())
                if len(receiver.posts) == 1:
                    receiver.gate.wait(30)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[GatedReceiver]:
    receiver = GatedReceiver()
    yield receiver
    receiver.close()


def _finished_hooked_job(store: JobStore, url: str) -> str:
    job_id = new_job_id()
    outcome = store.create(
        job_id=job_id,
        tenant=f"claims-{job_id[-6:]}",
        queue="cpu",
        spec_json={"base": "/b", "finetuned": "/f", "output": "/o"},
        labels={},
        webhook_url=url,
        webhook_secret=None,
        max_active=10,
    )
    assert outcome.kind == "created"
    assert store.finish(job_id, "succeeded", result={"output": "/o", "report": {}})
    return job_id


SETTINGS = Settings(webhook_allow=["127.0.0.1"], webhook_timeout_seconds=1.0, lease_seconds=1)


def test_a_second_delivery_chain_does_not_post_an_attempt_in_flight(api_stack, receiver):
    store = JobStore.from_url(api_stack.redis_url)
    job_id = _finished_hooked_job(store, receiver.url())
    webhook_id = webhook_id_for(job_id)
    first: list[float | None] = []
    chain = threading.Thread(
        target=lambda: first.append(deliver(store, SETTINGS, job_id, "job.succeeded", webhook_id))
    )
    chain.start()
    deadline = time.monotonic() + 10
    while not receiver.posts:
        assert time.monotonic() < deadline, "the first chain never posted"
        time.sleep(0.01)
    # The first chain's POST is in flight; a second chain (the sweeper's) comes in now.
    assert deliver(store, SETTINGS, job_id, "job.succeeded", webhook_id) is None
    assert len(receiver.posts) == 1
    receiver.gate.set()
    chain.join(10)
    assert first == [None]  # delivered
    deliveries = store.get(job_id).webhook.deliveries
    assert [(d.attempt, d.delivered) for d in deliveries] == [(1, True)]
    assert store.redis.zscore("fapm:webhooks-owed", job_id) is None
    # A third chain, later: the delivery has ended, nothing is posted.
    assert deliver(store, SETTINGS, job_id, "job.succeeded", webhook_id) is None
    assert len(receiver.posts) == 1


def test_a_dead_holders_claim_lapses_and_the_attempt_is_made(api_stack, receiver):
    """A delivery that claimed attempt 1 and died mid-POST: the attempt is refused to others
    while the claim holds (the stamp moved past it), and made once it has lapsed."""
    receiver.gate.set()
    store = JobStore.from_url(api_stack.redis_url)
    job_id = _finished_hooked_job(store, receiver.url())
    claim_seconds = 1.5  # timeout + lease / 2 in SETTINGS
    claimed_at = time.time()
    assert store.claim_webhook_attempt(job_id, 1, claim_seconds, expected_by=claimed_at + 1)
    stamp = store.redis.zscore("fapm:webhooks-owed", job_id)
    assert stamp == pytest.approx((claimed_at + 1) * 1000, abs=5)
    assert not store.claim_webhook_attempt(job_id, 1, claim_seconds, expected_by=claimed_at)
    assert not store.claim_webhook_attempt(job_id, 2, 60, expected_by=claimed_at)  # not next
    webhook_id = webhook_id_for(job_id)
    assert deliver(store, SETTINGS, job_id, "job.succeeded", webhook_id) is None
    assert receiver.posts == []
    assert store.redis.zscore("fapm:webhooks-owed", job_id) == stamp  # still owed
    time.sleep(max(0.0, claimed_at + claim_seconds + 0.1 - time.time()))
    assert deliver(store, SETTINGS, job_id, "job.succeeded", webhook_id) is None
    assert len(receiver.posts) == 1
    assert [d.attempt for d in store.get(job_id).webhook.deliveries] == [1]


def test_expected_by_moves_only_an_owed_stamp_and_marks_only_a_real_record(api_stack):
    store = JobStore.from_url(api_stack.redis_url)
    ghost = new_job_id()
    store.webhook_expected_by(ghost, time.time() + 60, dispatched=True)
    assert not store.redis.exists(f"fapm:job:{ghost}")  # no stray hash
    assert store.redis.zscore("fapm:webhooks-owed", ghost) is None  # not owed: not added
    job_id = _finished_hooked_job(store, "http://127.0.0.1:9/hook")
    by = time.time() + 60
    store.webhook_expected_by(job_id, by, dispatched=True)
    assert store.webhook_dispatched(job_id)
    assert store.redis.zscore("fapm:webhooks-owed", job_id) == int(by * 1000)
    store.webhook_settled(job_id)
