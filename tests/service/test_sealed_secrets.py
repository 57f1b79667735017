"""FAPM_SECRETS_KEYS end to end: a job's webhook URL (its token) and signing secret are sealed in
Redis, in its AOF and in DUMPs of the keys, while the worker still delivers to the full URL with
a valid signature; a record sealed with a rotated-out-of-first-place key, or written in clear
before the keys were set, still delivers; one sealed with a key the worker lacks is a failed
attempt with `unseal_failed`, retried (a key rollout may bring the key) and never POSTed, and the
worker goes on delivering.

Real processes: redis-server (its AOF turned on), uvicorn and a Celery worker with keys "B,A", a
receiver on 127.0.0.1 (allowed by FAST_ENV's FAPM_WEBHOOK_ALLOW)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet

from app.core.sealing import SEALED_PREFIX, Sealer
from app.jobs.records import JobRecord
from app.jobs.store import JobStore
from tests.service.conftest import FAST_ENV, client
from tests.service.test_worker_jobs import Jobs
from tests.service.test_worker_webhooks import Delivery
from tests.service.test_worker_webhooks import Receiver as WebhookReceiver
from worker.localstack import LocalStack
from worker.webhooks import UNSEAL_FAILED, verify

KEY_A, KEY_B, KEY_C = (Fernet.generate_key().decode() for _ in range(3))
TOKEN = "tok-7c1d9e2f4a6b"
SECRET = "whsec_c2VhbGVkLXNlY3JldC1mb3ItdGVzdHMtMDEyMzQ1"


class Receiver(WebhookReceiver):
    """test_worker_webhooks' receiver (200 to every POST), reached under per-job paths with a
    token in the query, as a registry's webhook URL often is."""

    def url(self, label: str) -> str:  # type: ignore[override]
        return super().url(f"/hook/{label}?token={TOKEN}&t=1")

    def delivery_for(self, job_id: str, timeout: float = 60) -> Delivery:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for delivery in self.deliveries:
                if delivery.headers.get("webhook-id") == f"msg_{job_id}":
                    return delivery
            time.sleep(0.05)
        raise AssertionError(f"no delivery for job {job_id} in {timeout:.0f} s")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def _aof_enabled(client: redis.Redis) -> bool:
    info = client.info("persistence")
    return info["aof_enabled"] == 1 and info["aof_rewrite_in_progress"] == 0


@pytest.fixture(scope="module")
def sealed_stack(tmp_path_factory, local_root) -> Iterator[LocalStack]:
    """Redis with its AOF on, the API and one worker, both with FAPM_SECRETS_KEYS="B,A"."""
    env = {**FAST_ENV, "FAPM_LOCAL_ROOTS": str(local_root), "FAPM_SECRETS_KEYS": f"{KEY_B},{KEY_A}"}
    stack = LocalStack(tmp_path_factory.mktemp("sealed_stack"), env=env)
    stack.workdir.mkdir(parents=True, exist_ok=True)
    try:
        stack.start_redis()
        # The fixtures' Redis keeps no AOF; a deployment's does (docker-compose.yml), and the
        # AOF is where the secrets were found at rest, so it is turned on here and read below.
        with redis.Redis.from_url(stack.redis_url) as admin:
            admin.config_set("appendonly", "yes")
            deadline = time.monotonic() + 30
            while not _aof_enabled(admin):
                assert time.monotonic() < deadline, "Redis did not turn its AOF on"
                time.sleep(0.05)
        stack.start_api()
        stack.start_worker()
        yield stack
    finally:
        stack.stop()


def failing_spec(local_root: Path, name: str) -> dict:
    """Inputs that do not exist: the job fails at once and its webhook is sent."""
    return {
        "base": str(local_root / "no-such-base"),
        "finetuned": str(local_root / "no-such-sft"),
        "output": str(local_root / "out" / name),
    }


def written_with(stack: LocalStack, sealer: Sealer) -> Jobs:
    """Jobs written the way an API process with these keys writes them (then enqueued)."""
    jobs = Jobs(stack)
    jobs.store = JobStore.from_url(stack.redis_url, sealer=sealer)
    return jobs


def submit_written_with(jobs: Jobs, spec: dict, webhook: dict) -> str:
    job_id = jobs.submit(spec, webhook=webhook, enqueue=False)
    jobs.enqueue(job_id)
    return job_id


def assert_signed_delivery_to_the_full_url(delivery: Delivery, label: str, job_id: str) -> None:
    assert delivery.target == f"/hook/{label}?token={TOKEN}&t=1"
    headers = delivery.headers
    assert headers["webhook-id"] == f"msg_{job_id}"
    signed = (headers["webhook-id"], headers["webhook-timestamp"], delivery.body)
    assert verify(SECRET, *signed, headers["webhook-signature"])
    assert not verify("another secret", *signed, headers["webhook-signature"])


def aof_bytes(stack: LocalStack) -> bytes:
    files = sorted((stack.workdir / "redis").rglob("*.aof"))
    assert files, "Redis wrote no AOF file"
    return b"".join(path.read_bytes() for path in files)


def test_sealed_at_rest_delivered_in_full_and_signed(sealed_stack, local_root, receiver):
    url = receiver.url("api")
    with client(sealed_stack) as http:
        submitted = http.post(
            "/v1/jobs",
            json={
                **failing_spec(local_root, "sealed-api"),
                "webhook": {"url": url, "secret": SECRET},
            },
        )
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        delivery = receiver.delivery_for(job_id)
        assert_signed_delivery_to_the_full_url(delivery, "api", job_id)
        # The record shows what it showed before sealing: the URL with its query redacted.
        shown = http.get(f"/v1/jobs/{job_id}")
        assert shown.status_code == 200
        webhook = shown.json()["webhook"]
        assert webhook["url"] == url.replace(TOKEN, "REDACTED").replace("t=1", "t=REDACTED")
        assert webhook["signed"] is True
        assert SEALED_PREFIX not in shown.text and TOKEN not in shown.text
    assert TOKEN not in delivery.body.decode() and SECRET not in delivery.body.decode()

    raw = redis.Redis.from_url(sealed_stack.redis_url)
    stored_url = raw.hget(f"fapm:job:{job_id}", "webhook_url")
    stored_secret = raw.get(f"fapm:job:{job_id}:webhook")
    for stored, clear in ((stored_url, url), (stored_secret, SECRET)):
        assert stored.startswith(SEALED_PREFIX.encode())
        assert Sealer([KEY_B]).unseal(stored.decode()) == clear  # sealed with the first key
    assert TOKEN.encode() not in stored_url
    assert SECRET.encode() not in stored_secret and SECRET[6:].encode() not in stored_secret
    for key in (f"fapm:job:{job_id}", f"fapm:job:{job_id}:webhook"):
        dumped = raw.dump(key)
        assert TOKEN.encode() not in dumped and SECRET[6:].encode() not in dumped

    # The AOF: wait until it holds this job's record (so the search below can fail), then the
    # token and the secret are not in it.
    deadline = time.monotonic() + 15
    while job_id.encode() not in aof_bytes(sealed_stack):
        assert time.monotonic() < deadline, "the job never reached the AOF"
        time.sleep(0.1)
    aof = aof_bytes(sealed_stack)
    assert stored_url in aof  # the sealed form is what the AOF holds
    assert TOKEN.encode() not in aof
    assert SECRET.encode() not in aof and SECRET[6:].encode() not in aof


def test_a_record_sealed_with_the_old_key_or_stored_in_clear_still_delivers(
    sealed_stack, local_root, receiver
):
    webhook = {"secret": SECRET}
    before_rotation = written_with(sealed_stack, Sealer([KEY_A]))  # keys were "A"
    old_id = submit_written_with(
        before_rotation,
        failing_spec(local_root, "sealed-old"),
        {**webhook, "url": receiver.url("old")},
    )
    before_keys = written_with(sealed_stack, Sealer())  # no keys: stored in clear
    clear_id = submit_written_with(
        before_keys,
        failing_spec(local_root, "sealed-clear"),
        {**webhook, "url": receiver.url("clear")},
    )
    raw = redis.Redis.from_url(sealed_stack.redis_url, decode_responses=True)
    assert raw.get(f"fapm:job:{old_id}:webhook").startswith(SEALED_PREFIX)
    assert raw.get(f"fapm:job:{clear_id}:webhook") == SECRET

    assert_signed_delivery_to_the_full_url(receiver.delivery_for(old_id), "old", old_id)
    assert_signed_delivery_to_the_full_url(receiver.delivery_for(clear_id), "clear", clear_id)


def test_a_record_sealed_with_a_key_the_worker_lacks_is_a_failed_delivery(
    sealed_stack, local_root, receiver
):
    foreign = written_with(sealed_stack, Sealer([KEY_C]))
    job_id = submit_written_with(
        foreign,
        failing_spec(local_root, "sealed-foreign"),
        {"url": receiver.url("foreign"), "secret": SECRET},
    )
    jobs = Jobs(sealed_stack)  # reads over the API, whose keys lack C too

    def attempted(record: JobRecord) -> bool:
        return bool(record.webhook and record.webhook.deliveries)

    record = jobs.wait(job_id, until=attempted, timeout=60)
    attempt = record.webhook.deliveries[0]
    assert attempt.error.startswith(f"{UNSEAL_FAILED}: ") and "FAPM_SECRETS_KEYS" in attempt.error
    assert not attempt.delivered and attempt.status_code is None
    # Retried on the usual schedule: during a key rollout a worker with the key may take it.
    assert attempt.next_attempt_at is not None
    assert record.webhook.url == "REDACTED"  # the API could not open it either, and still answers
    raw = redis.Redis.from_url(sealed_stack.redis_url)
    assert raw.zscore("fapm:webhooks-owed", job_id) is not None  # still owed, not given up

    # Nothing went out for it, and the worker goes on: the next job's webhook is delivered.
    next_id = submit_written_with(
        written_with(sealed_stack, Sealer([KEY_A])),
        failing_spec(local_root, "sealed-after-foreign"),
        {"url": receiver.url("after"), "secret": SECRET},
    )
    assert_signed_delivery_to_the_full_url(receiver.delivery_for(next_id), "after", next_id)

    def retried(record: JobRecord) -> bool:
        return len(record.webhook.deliveries) >= 2

    again = jobs.wait(job_id, until=retried, timeout=60).webhook.deliveries[1]  # ~0.3 s later
    assert again.error.startswith(f"{UNSEAL_FAILED}: ") and not again.delivered
    assert all(d.headers["webhook-id"] != f"msg_{job_id}" for d in receiver.deliveries)
    assert all("/hook/foreign" not in d.target for d in receiver.deliveries)
