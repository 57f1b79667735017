"""A worker drains whoever gets the SIGTERM: sent to the Celery main process alone (docker stop,
Kubernetes, the entrypoint) or to its whole process group (systemd's KillMode=control-group, some
orchestrators), the running job finishes on its first attempt and the worker then exits. Past the
entrypoint's WORKER_DRAIN_SECONDS, a cold shutdown hands the job back at once, even one blocked
where Python cannot interrupt it, and the worker exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.service.test_worker_jobs import Jobs, big_spec, write_big_pair
from tests.service.test_worker_recovery import queued_job_ids, wait_for
from tests.service.test_worker_webhooks import tiny_spec
from worker.localstack import Process
from worker.tasks.startup import PARENT_SIGTERM_GRACE_SECONDS

ENTRYPOINT = Path(__file__).resolve().parents[2] / "docker" / "worker_entrypoint.py"


@pytest.fixture(scope="module")
def big_pair(local_root):
    return write_big_pair(local_root / "big_pair")


def running(record) -> bool:
    return record.status == "running" and record.progress.fraction > 0.05


def test_sigterm_to_the_whole_process_group_lets_the_job_finish(make_stack, big_pair, local_root):
    stack = make_stack()
    stack.start_redis()
    worker = stack.start_worker("drain", extra_args=["--concurrency", "1"])
    jobs = Jobs(stack)
    job_id = jobs.submit(big_spec(big_pair, local_root / "drain_group" / "out"))
    jobs.wait(job_id, running)

    signalled_at = datetime.now(UTC)
    os.killpg(worker.popen.pid, signal.SIGTERM)  # the main process and its pool process
    record = jobs.wait(job_id, timeout=120)
    assert worker.popen.wait(60) == 0
    assert record.status == "succeeded", record.error
    assert record.finished_at > signalled_at  # it was running when the signal came
    assert record.attempts == 1  # finished by the process that started it, not redone
    log = worker.log.read_text()
    assert "ignored; the main process drains" in log, log[-3000:]  # the pool process got it
    assert "Warm shutdown" in log


def test_past_the_drain_deadline_a_blocked_job_goes_back_and_runs_elsewhere(
    make_stack, service_pair, local_root, tmp_path
):
    """The job sleeps in its pool process (the test hook), where a SIGTERM's Python handler never
    runs: the cold shutdown still ends (the pool process is killed after its grace), its message
    goes back to the head of the queue, and the next worker runs it to success."""
    pause_dir = tmp_path / "pauses"
    pause_dir.mkdir()
    stack = make_stack(FAPM_TEST_PAUSE_DIR=str(pause_dir))
    stack.start_redis()
    argv = [sys.executable, str(ENTRYPOINT), sys.executable, "-m", "celery"]
    argv += ["-A", "worker.celery_app", "worker", "--hostname", "cold@%h", "--concurrency", "1"]
    log = stack.workdir / "cold.log"
    with log.open("ab") as handle:
        popen = subprocess.Popen(
            argv,
            env={**stack.child_env(), "WORKER_DRAIN_SECONDS": "1"},
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    entrypoint = Process("cold", popen, log)
    stack.processes.append(entrypoint)
    stack._wait_for_heartbeat("cold@", entrypoint)
    jobs = Jobs(stack)
    out = local_root / "drain_cold" / "out"
    job_id = jobs.submit(tiny_spec(service_pair, out), enqueue=False)
    (pause_dir / f"{job_id}.pause").write_text("started")
    jobs.enqueue(job_id)
    wait_for(pause_dir / f"started-{job_id}")

    started = time.monotonic()
    popen.send_signal(signal.SIGTERM)
    code = popen.wait(60)
    took = time.monotonic() - started
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert took < 1 + PARENT_SIGTERM_GRACE_SECONDS + 15, text[-3000:]
    assert "drain deadline" in text and "killing it" in text, text[-3000:]
    assert jobs.get(job_id).status == "running"  # stopped, not finished
    assert queued_job_ids(stack, "cpu") == [job_id]  # back on its queue at once
    assert jobs.store.redis.hlen("unacked") == 0

    stack.start_worker("next", extra_args=["--concurrency", "1"])
    record = jobs.wait(job_id, timeout=120)
    assert record.status == "succeeded", record.error
    assert record.attempts == 2
