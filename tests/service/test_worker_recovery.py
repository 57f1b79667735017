"""No killed worker strands a job or a webhook: a worker SIGKILLed at each instant of a job's life
(its pool process alone, or the whole worker) and the job still runs to its end, and its webhook
still goes out, within about two lease periods; a job re-enqueued by the sweeper goes first, once.

The instants are reached with run_job's test hook (`pause_for_test`, on only where the worker's
environment sets FAPM_TEST_PAUSE_DIR): the worker that takes the job writes a marker and sleeps at
the point the job's plan file names, and the test kills it there.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import FAST_ENV
from tests.service.test_worker_jobs import Jobs
from tests.service.test_worker_webhooks import Receiver, tiny_spec
from worker.engine.pipeline import REPORT_FILE
from worker.localstack import LocalStack, Process
from worker.webhooks import webhook_id_for

LEASE = float(FAST_ENV["FAPM_LEASE_SECONDS"])
HEARTBEAT = float(FAST_ENV["FAPM_HEARTBEAT_SECONDS"])
# Each recovery must finish within two lease periods and a beat (plus the run itself).
RECOVERY_BOUND = 2 * LEASE + HEARTBEAT + 8


class Workers:
    """A redis-server and a pool of one-process Celery workers that all honour pause plans."""

    def __init__(self, stack: LocalStack, pause_dir: Path) -> None:
        self.stack = stack
        self.pause_dir = pause_dir
        self.live: list[Process] = []
        self.started = 0

    def keep(self, count: int) -> None:
        self.live = [w for w in self.live if w.alive()]
        while len(self.live) < count:
            self.started += 1
            self.live.append(
                self.stack.start_worker(f"w{self.started}", extra_args=["--concurrency", "1"])
            )

    def holding(self, pool_pid: int) -> Process:
        """The worker whose pool process is `pool_pid`."""
        parent = int(Path(f"/proc/{pool_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        (worker,) = [w for w in self.live if w.popen.pid == parent]
        return worker


@pytest.fixture(scope="module")
def workers(tmp_path_factory, local_root) -> Iterator[Workers]:
    pause_dir = tmp_path_factory.mktemp("pauses")
    env = {**FAST_ENV, "FAPM_LOCAL_ROOTS": str(local_root), "FAPM_TEST_PAUSE_DIR": str(pause_dir)}
    stack = LocalStack(tmp_path_factory.mktemp("recovery_stack"), env=env)
    stack.workdir.mkdir(parents=True, exist_ok=True)
    try:
        stack.start_redis()
        yield Workers(stack, pause_dir)
    finally:
        for process in stack.processes:  # a paused worker would not drain: no SIGTERM wait
            process.kill(signal.SIGKILL)
        stack.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def wait_for(path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)
    return path.read_text()


# Per pause point: the job's status while the worker is paused there ("started" is mid-job:
# leased, its lease renewed), and its attempts once recovered (a start counts one).
STATUS_AT = {"taken": "queued", "noted": "queued", "started": "running", "finished": "succeeded"}
ATTEMPTS_AFTER = {"taken": 1, "noted": 1, "started": 2, "finished": 1}


@pytest.mark.parametrize("target", ["pool_process", "whole_worker"])
@pytest.mark.parametrize("point", ["taken", "noted", "started", "finished"])
def test_a_worker_killed_at_any_instant_strands_neither_job_nor_webhook(
    workers, service_pair, local_root, receiver, point, target
):
    workers.keep(2)  # the other one recovers a whole-worker kill
    jobs = Jobs(workers.stack)
    out = local_root / "recovery" / f"{point}-{target}"
    job_id = jobs.submit(
        tiny_spec(service_pair, out), webhook={"url": receiver.url()}, enqueue=False
    )
    (workers.pause_dir / f"{job_id}.pause").write_text(point)
    jobs.enqueue(job_id)

    pool_pid = int(wait_for(workers.pause_dir / f"{point}-{job_id}"))
    holder = workers.holding(pool_pid)
    paused = jobs.get(job_id)
    if target == "pool_process":
        os.kill(pool_pid, signal.SIGKILL)
    else:
        holder.kill(signal.SIGKILL)
        holder.popen.wait(10)
    killed_at = time.time()

    record = jobs.wait(job_id, timeout=RECOVERY_BOUND + 30)
    recovered = time.time() - killed_at
    deliveries = receiver.wait_for(1, timeout=RECOVERY_BOUND + 30)
    delivered = deliveries[0].at - killed_at
    print(f"RECOVERY point={point} target={target} job={recovered:.1f}s webhook={delivered:.1f}s")

    assert paused.status == STATUS_AT[point]
    assert record.status == "succeeded", record.error
    assert record.attempts == ATTEMPTS_AFTER[point]
    assert (out / REPORT_FILE).exists()
    assert recovered < RECOVERY_BOUND and delivered < RECOVERY_BOUND
    assert {d.headers["webhook-id"] for d in deliveries} == {webhook_id_for(job_id)}
    assert json.loads(deliveries[0].body)["type"] == "job.succeeded"
    # Nothing is owed or re-enqueued any more, and the job is not run again.
    time.sleep(LEASE / 2)
    assert jobs.store.redis.zscore("fapm:webhooks-owed", job_id) is None
    assert not jobs.store.is_requeued(job_id)
    assert jobs.get(job_id).attempts == record.attempts
    assert len(receiver.deliveries) <= 2  # at least once; a duplicate shares the webhook-id


def queued_job_ids(stack: LocalStack, queue: str) -> list[str]:
    """The job ids of the run_job messages waiting on `queue`, head of the line first (workers
    take from the right end of the Redis list)."""
    import base64

    import redis

    client = redis.Redis.from_url(stack.redis_url)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    ids = []
    for item in reversed(raw):
        message = json.loads(item)
        body = json.loads(base64.b64decode(message["body"]))
        ids.append(body[0][0])
    return ids


def test_a_requeued_job_goes_first_and_is_enqueued_once(make_stack, service_pair, local_root):
    """The state a Redis restart leaves (as a worker killed mid-job does): a job `running` with
    no lease and no message, behind jobs waiting in its queue. The sweeper re-enqueues it once,
    at the head of the line, however many lease periods it then waits; it runs first."""
    lease = 2.0
    stack = make_stack(FAPM_LEASE_SECONDS=str(int(lease)))
    stack.start_redis()
    # A worker that sweeps but takes no prune job: the re-enqueued one waits as long as we like.
    sweeper = stack.start_worker("sweeper", extra_args=["-Q", "webhooks"])
    jobs = Jobs(stack)
    out = local_root / "requeued_first"
    waiting = [jobs.submit(tiny_spec(service_pair, out / f"waiting{i}")) for i in range(3)]
    orphan = jobs.submit(tiny_spec(service_pair, out / "orphan"), enqueue=False)
    jobs.store.mark_enqueued(orphan)
    jobs.store.note_running(orphan)
    assert not isinstance(jobs.store.start(orphan, lease_seconds=0.05), str)
    assert queued_job_ids(stack, "cpu") == waiting  # first in, first out

    deadline = time.monotonic() + 4 * lease + 10
    while not jobs.store.is_requeued(orphan):
        assert time.monotonic() < deadline, "the orphan was never re-enqueued"
        time.sleep(0.05)
    time.sleep(4 * lease)  # four more sweeps past its cutoff
    assert queued_job_ids(stack, "cpu") == [orphan, *waiting]
    log = sweeper.log.read_text()
    assert log.count(f"job {orphan} is running with no lease") == 1, log[-3000:]

    stack.start_worker("runner", extra_args=["-Q", "cpu", "--concurrency", "1"])
    records = {job_id: jobs.wait(job_id, timeout=90) for job_id in [orphan, *waiting]}
    assert all(r.status == "succeeded" for r in records.values()), records
    order = sorted(records, key=lambda job_id: records[job_id].finished_at)
    assert order == [orphan, *waiting]
    assert records[orphan].attempts == 2 and not jobs.store.is_requeued(orphan)


# -- a webhook delivery lost with its worker --------------------------------------------------------
# Deliveries run on a `-Q webhooks` worker that the test kills (the whole worker, as a lost node
# would), and a second one started after the kill carries on. The delivery's stamp in
# webhooks-owed goes stale a webhook timeout (or a retry's ETA + timeout) and a lease after its
# last step, and the sweeper (the job worker's heartbeat) queues it again.
HOOK_TIMEOUT = 3.0
FIRST_RETRY = 4.0


def start_delivery_stack(make_stack, **env: str) -> tuple[LocalStack, Process, Jobs]:
    stack = make_stack(
        FAPM_WEBHOOK_TIMEOUT_SECONDS=str(HOOK_TIMEOUT),
        FAPM_WEBHOOK_FIRST_RETRY_SECONDS=str(FIRST_RETRY),
        **env,
    )
    stack.start_redis()
    stack.start_worker("runner", extra_args=["-Q", "cpu", "--concurrency", "1"])
    hooks = stack.start_worker("hooks1", extra_args=["-Q", "webhooks", "--concurrency", "1"])
    return stack, hooks, Jobs(stack)


def kill_and_replace(stack: LocalStack, hooks: Process) -> float:
    """SIGKILL the delivery worker (main and pool process); start another. Returns the kill's
    time."""
    hooks.kill(signal.SIGKILL)
    hooks.popen.wait(10)
    killed_at = time.time()
    stack.start_worker("hooks2", extra_args=["-Q", "webhooks", "--concurrency", "1"])
    return killed_at


def recorded_attempts(jobs: Jobs, job_id: str, count: int) -> list:
    """The job record's delivery attempts, once it lists `count` (each is recorded after its
    POST returns)."""
    deadline = time.monotonic() + 30
    while len(attempts := jobs.get(job_id).webhook.deliveries) < count:
        assert time.monotonic() < deadline, f"{len(attempts)} of {count} attempts recorded"
        time.sleep(0.05)
    return attempts


def assert_settled_and_quiet(jobs: Jobs, job_id: str, receiver: Receiver, count: int) -> None:
    """Nothing owed, and no delivery beyond `count` for several sweeps."""
    time.sleep(2 * LEASE)
    assert jobs.store.redis.zscore("fapm:webhooks-owed", job_id) is None
    assert len(receiver.deliveries) == count
    assert {d.headers["webhook-id"] for d in receiver.deliveries} == {webhook_id_for(job_id)}


def test_a_delivery_in_flight_when_its_worker_dies_is_made_again(
    make_stack, service_pair, local_root, receiver
):
    receiver.answers = [None, 200]  # the first POST hangs: the worker dies mid-request
    stack, hooks, jobs = start_delivery_stack(make_stack)
    job_id = jobs.submit(
        tiny_spec(service_pair, local_root / "hook_in_flight"), webhook={"url": receiver.url()}
    )
    receiver.wait_for(1, timeout=90)
    killed_at = kill_and_replace(stack, hooks)

    bound = HOOK_TIMEOUT + 2 * LEASE + HEARTBEAT + 8
    deliveries = receiver.wait_for(2, timeout=bound + 30)
    delivered = deliveries[1].at - killed_at
    print(f"RECOVERY webhook in flight: delivered {delivered:.1f} s after the kill")
    assert delivered < bound
    assert json.loads(deliveries[1].body)["type"] == "job.succeeded"
    # The lost attempt was never recorded: the one that was made is attempt 1, delivered.
    (attempt,) = recorded_attempts(jobs, job_id, 1)
    assert attempt.attempt == 1 and attempt.delivered and attempt.status_code == 200
    assert_settled_and_quiet(jobs, job_id, receiver, 2)


@pytest.mark.parametrize("outcome", ["delivered", "given_up"])
def test_a_retry_whose_countdown_dies_with_its_worker_continues_the_schedule(
    make_stack, service_pair, local_root, receiver, outcome
):
    """The first attempt fails; its retry (a countdown message the delivery worker holds,
    unacknowledged) dies with the worker. Another worker makes attempt 2 no earlier than it was
    due: delivered, or, past FAPM_WEBHOOK_RETRY_SECONDS from attempt 1, given up for good."""
    receiver.answers = [500, 200] if outcome == "delivered" else [500]
    window = {"delivered": {}, "given_up": {"FAPM_WEBHOOK_RETRY_SECONDS": "8"}}[outcome]
    stack, hooks, jobs = start_delivery_stack(make_stack, **window)
    job_id = jobs.submit(
        tiny_spec(service_pair, local_root / f"hook_countdown_{outcome}"),
        webhook={"url": receiver.url()},
    )
    receiver.wait_for(1, timeout=90)
    due = recorded_attempts(jobs, job_id, 1)[0].next_attempt_at
    assert due is not None
    deadline = time.monotonic() + 30
    # The retry's message is taken (held until due), not waiting in the queue.
    while jobs.store.redis.llen("webhooks") or not jobs.store.redis.hlen("unacked"):
        assert time.monotonic() < deadline, "the retry's message was never taken"
        time.sleep(0.05)
    assert time.time() < due.timestamp(), "killed before the retry was due"
    killed_at = kill_and_replace(stack, hooks)

    bound = FIRST_RETRY * 1.25 + HOOK_TIMEOUT + 2 * LEASE + HEARTBEAT + 8
    deliveries = receiver.wait_for(2, timeout=bound + 30)
    delivered = deliveries[1].at - killed_at
    print(f"RECOVERY webhook countdown ({outcome}): attempt 2 {delivered:.1f} s after the kill")
    assert delivered < bound
    assert deliveries[1].at >= due.timestamp() - 0.05  # not before it was due

    attempts = recorded_attempts(jobs, job_id, 2)
    assert [a.attempt for a in attempts] == [1, 2]  # continued, not restarted
    assert attempts[1].next_attempt_at is None  # ended: delivered, or out of retry time
    assert attempts[1].delivered == (outcome == "delivered")
    assert_settled_and_quiet(jobs, job_id, receiver, 2)
