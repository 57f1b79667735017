"""A worker drains whoever gets the SIGTERM: sent to the Celery main process alone (docker stop,
Kubernetes, the entrypoint) or to its whole process group (systemd's KillMode=control-group, some
orchestrators), the running job finishes on its first attempt and the worker then exits."""

from __future__ import annotations

import os
import signal
from datetime import UTC, datetime

import pytest

from tests.service.test_worker_jobs import Jobs, big_spec, write_big_pair


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
