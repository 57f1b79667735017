"""A worker drains whoever gets the SIGTERM: sent to the Celery main process alone (docker stop,
Kubernetes, the entrypoint) or to its whole process group (systemd's KillMode=control-group, some
orchestrators), the running job finishes on its first attempt and the worker then exits. A cold
shutdown (the entrypoint's WORKER_DRAIN_SECONDS deadline) still hands the job back at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.service.test_worker_jobs import Jobs, big_spec, write_big_pair
from tests.service.test_worker_recovery import queued_job_ids
from worker.localstack import Process

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

    os.killpg(worker.popen.pid, signal.SIGTERM)  # the main process and its pool process
    record = jobs.wait(job_id, timeout=120)
    assert worker.popen.wait(60) == 0
    assert record.status == "succeeded", record.error
    assert record.attempts == 1  # finished by the process that started it, not redone
    log = worker.log.read_text()
    assert "ignored; the main process drains" in log, log[-3000:]  # the pool process got it
    assert "Warm shutdown" in log


def test_a_cold_shutdown_after_a_group_sigterm_still_hands_the_job_back(
    make_stack, big_pair, local_root
):
    """The entrypoint's drain deadline (SIGQUIT to Celery) after a SIGTERM to the group: the
    pool process obeys its parent's SIGTERM, the job goes straight back to its queue, and the
    next worker runs it."""
    stack = make_stack()
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
    job_id = jobs.submit(big_spec(big_pair, local_root / "drain_cold" / "out"))
    jobs.wait(job_id, running)

    started = time.monotonic()
    os.killpg(popen.pid, signal.SIGTERM)
    popen.wait(60)
    assert time.monotonic() - started < 30, log.read_text()[-3000:]
    assert "drain deadline" in log.read_text()
    assert jobs.get(job_id).status == "running"  # stopped, not finished
    assert queued_job_ids(stack, "cpu") == [job_id]  # back on its queue at once
    assert jobs.store.redis.hlen("unacked") == 0

    stack.start_worker("next", extra_args=["--concurrency", "1"])
    record = jobs.wait(job_id, timeout=120)
    assert record.status == "succeeded", record.error
    assert record.attempts == 2
