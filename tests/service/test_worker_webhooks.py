"""Webhooks out, end to end: a real receiver on 127.0.0.1 (allowed by FAST_ENV's
FAPM_WEBHOOK_ALLOW) checks Standard Webhooks signatures independently of worker/webhooks.py and
answers what each test scripts; the worker retries with backoff and records every attempt."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.service.test_worker_jobs import Jobs

SECRET_KEY = b"0123456789abcdef0123456789abcdef"
SECRET = "whsec_" + base64.b64encode(SECRET_KEY).decode()


@dataclass
class Delivery:
    at: float
    headers: dict[str, str]
    body: bytes
    target: str = ""  # the request line's path and query


class Receiver:
    """An HTTP endpoint that answers the scripted status codes in turn (then the last one); an
    answer of None holds the request unanswered until the receiver closes (a hung endpoint)."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.answers: list[int | None] = [200]
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.deliveries.append(Delivery(time.time(), headers, body, self.path))
                index = min(len(receiver.deliveries), len(receiver.answers)) - 1
                if receiver.answers[index] is None:
                    receiver.released.wait(120)
                    return
                self.send_response(receiver.answers[index])
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def wait_for(self, count: int, timeout: float = 30) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count:
            assert time.monotonic() < deadline, f"{len(self.deliveries)} of {count} deliveries"
            time.sleep(0.02)
        return self.deliveries

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def signature_is_valid(key: bytes, delivery: Delivery) -> bool:
    """What a receiver does (Standard Webhooks): HMAC-SHA256 over "id.timestamp.body"."""
    signed = (
        f"{delivery.headers['webhook-id']}.{delivery.headers['webhook-timestamp']}.".encode()
        + delivery.body
    )
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(expected, candidate)
        for candidate in delivery.headers.get("webhook-signature", "").split()
    )


@pytest.fixture(scope="module")
def jobs(service) -> Jobs:
    """The session's service stack (redis-server, API, one worker), driven over HTTP."""
    return Jobs(service)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def tiny_spec(pair, output) -> dict:
    return {"base": str(pair.base), "finetuned": str(pair.finetuned), "output": str(output)}


def test_webhook_is_retried_after_500s_with_one_id_and_valid_signatures(
    jobs, service, service_pair, local_root, receiver
):
    receiver.answers = [500, 500, 200]
    job_id = jobs.submit(
        tiny_spec(service_pair, local_root / "hooked" / "out"),
        webhook={"url": receiver.url(), "secret": SECRET},
    )
    deliveries = receiver.wait_for(3)
    assert jobs.wait(job_id).status == "succeeded"

    assert {d.headers["webhook-id"] for d in deliveries} == {f"msg_{job_id}"}
    for delivery in deliveries:
        assert signature_is_valid(SECRET_KEY, delivery), delivery.headers
        assert abs(int(delivery.headers["webhook-timestamp"]) - delivery.at) < 30
        assert delivery.headers["content-type"] == "application/json"
        event = json.loads(delivery.body)
        assert event["type"] == "job.succeeded"
        assert event["data"]["id"] == job_id and event["data"]["status"] == "succeeded"
        assert event["data"]["result"]["output"].endswith("hooked/out")
        assert SECRET not in delivery.body.decode()
    # A tampered body or another key does not verify.
    forged = Delivery(0, deliveries[0].headers, deliveries[0].body + b" ")
    assert not signature_is_valid(SECRET_KEY, forged)
    assert not signature_is_valid(b"another key", deliveries[0])
    # Exponential backoff from FAPM_WEBHOOK_FIRST_RETRY_SECONDS=0.3 (+-25% jitter), doubling.
    first_gap = deliveries[1].at - deliveries[0].at
    second_gap = deliveries[2].at - deliveries[1].at
    assert 0.2 <= first_gap and 0.4 <= second_gap and second_gap > first_gap

    deadline = time.monotonic() + 10
    while len(jobs.get(job_id).webhook.deliveries) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    webhook = jobs.get(job_id).webhook
    assert webhook is not None and webhook.signed and webhook.url == receiver.url()
    attempts = webhook.deliveries
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert [a.status_code for a in attempts] == [500, 500, 200]
    assert [a.delivered for a in attempts] == [False, False, True]
    assert all(a.next_attempt_at is not None for a in attempts[:2])
    assert attempts[2].next_attempt_at is None and attempts[2].error is None
    for earlier, later in itertools.pairwise(attempts):
        assert later.at >= earlier.next_attempt_at - timedelta(milliseconds=50)
    time.sleep(1)
    assert len(receiver.deliveries) == 3  # nothing after the 2xx
    log = (service.workdir / "worker.log").read_text()
    assert SECRET not in log and SECRET[6:] not in log


def test_a_failed_job_is_reported_and_410_stops_the_retries(
    jobs, service_pair, local_root, receiver
):
    receiver.answers = [410]
    spec = tiny_spec(service_pair, local_root / "hooked_failed" / "out")
    spec["base"] = str(local_root / "missing-base")
    job_id = jobs.submit(spec, webhook={"url": receiver.url()})  # unsigned
    (delivery,) = receiver.wait_for(1)
    event = json.loads(delivery.body)
    assert event["type"] == "job.failed"
    assert event["data"]["error"]["code"] == "source_not_found"
    assert "webhook-signature" not in delivery.headers
    time.sleep(1.5)  # first retry would come after ~0.3 s
    assert len(receiver.deliveries) == 1
    (attempt,) = jobs.get(job_id).webhook.deliveries
    assert attempt.status_code == 410 and not attempt.delivered and attempt.next_attempt_at is None


def test_a_job_cancelled_while_queued_still_reports_its_end(
    jobs, service_pair, local_root, receiver
):
    job_id = jobs.submit(
        tiny_spec(service_pair, local_root / "hooked_cancelled" / "out"),
        webhook={"url": receiver.url(), "secret": "plain secret"},
        enqueue=False,
    )
    assert jobs.cancel(job_id) == "cancelled"
    jobs.enqueue(job_id)  # the worker drops the job, but owes its webhook
    (delivery,) = receiver.wait_for(1)
    assert json.loads(delivery.body)["type"] == "job.cancelled"
    assert signature_is_valid(b"plain secret", delivery)
    assert jobs.get(job_id).attempts == 0
