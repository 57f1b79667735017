"""Nothing lost, nothing doubled: a worker killed mid-job (SIGKILL to its whole process group) and
the job's re-run by the next worker; the engine's handling of a killed attempt's leftovers."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import pytest

from tests.service.conftest import FAST_ENV
from tests.service.test_worker_jobs import (
    Jobs,
    OutputWatcher,
    assert_same_output,
    big_spec,
    reference_output,
    staging_dirs,
    write_big_pair,
)
from worker.engine.pipeline import REPORT_FILE, run_prune
from worker.errors import OutputExists
from worker.io.staging import job_staging_prefix
from worker.localstack import LocalStack
from worker.spec import JobSpec


@pytest.fixture(scope="module")
def big_pair(local_root):
    return write_big_pair(local_root / "big_pair")


def test_a_job_whose_worker_is_killed_is_rerun_to_the_same_bytes(make_stack, big_pair, local_root):
    # Short lease and visibility timeout, so the take-over happens within the test.
    stack = make_stack(FAPM_LEASE_SECONDS="3", FAPM_VISIBILITY_TIMEOUT_SECONDS="5")
    stack.start_redis()
    stack.start_api()
    first = stack.start_worker("first")
    jobs = Jobs(stack)
    out = local_root / "killed" / "out"
    spec = big_spec(big_pair, out)
    reference = reference_output(spec, local_root / "references")

    watcher = OutputWatcher(out)
    watcher.start()
    seen = []
    try:
        job_id = jobs.submit(spec)
        jobs.wait(job_id, lambda r: r.progress.stage == "prune" and r.progress.fraction > 0.2)
        first.kill(signal.SIGKILL)
        first.popen.wait(10)
        killed_at = jobs.get(job_id)
        assert killed_at.status == "running" and killed_at.progress.fraction < 1.0
        assert not out.exists() and staging_dirs(out), "the killed attempt left its staging dir"

        second = stack.start_worker("second")
        record = jobs.wait(job_id, timeout=90, seen=seen)
    finally:
        watcher.stop()

    assert record.status == "succeeded", record.error
    assert record.attempts == 2  # one take-over; duplicate deliveries never started it again
    assert not watcher.partial, f"partial output visible: {watcher.partial[:3]}"
    fractions = [r.progress.fraction for r in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert_same_output(out, reference)
    assert json.loads((out / REPORT_FILE).read_text())["job_id"] == job_id
    assert staging_dirs(out) == []  # the dead attempt's leftovers were removed
    # The duplicate messages (Celery's re-delivery, the sweeper's re-enqueue) all drain without
    # touching the finished job.
    time.sleep(3)
    after = jobs.get(job_id)
    assert after.status == "succeeded" and after.attempts == 2

    # A worker that shuts down (SIGTERM) removes its heartbeat at once (a killed one's expires
    # after FAPM_HEARTBEAT_FRESH_SECONDS).
    second.stop()
    assert second.popen.returncode == 0
    assert jobs.store.fresh_workers(max_age=3600) == {}


@pytest.fixture(scope="module")
def plain_stack(tmp_path_factory, local_root) -> Iterator[LocalStack]:
    """redis-server and a worker, no API (jobs written through JobStore); the sweeper enqueues
    jobs left unenqueued for 1 s."""
    env = {**FAST_ENV, "FAPM_LOCAL_ROOTS": str(local_root), "FAPM_UNENQUEUED_GRACE_SECONDS": "1"}
    stack = LocalStack(tmp_path_factory.mktemp("plain_stack"), env=env)
    stack.workdir.mkdir(parents=True, exist_ok=True)
    try:
        stack.start_redis()
        stack.start_worker()
        yield stack
    finally:
        stack.stop()


def test_a_job_killed_after_publishing_is_recorded_as_succeeded(
    plain_stack, service_pair, local_root
):
    """The worker died between the rename and the record update: the re-run finds the output
    its own job published and records it instead of failing with output_exists."""
    jobs = Jobs(plain_stack)
    out = local_root / "published" / "out"
    spec = {
        "base": str(service_pair.base),
        "finetuned": str(service_pair.finetuned),
        "output": str(out),
        "kernel": "torch",
    }
    job_id = jobs.submit(spec, enqueue=False)
    jobs.store.mark_enqueued(job_id)  # keep the sweeper off it until it is published
    run_prune(JobSpec.model_validate(spec), job_id=job_id)  # "the killed attempt"
    published = (out / REPORT_FILE).read_bytes()

    jobs.enqueue(job_id)
    record = jobs.wait(job_id, timeout=60)
    assert record.status == "succeeded", record.error
    assert record.result is not None and record.result.report["job_id"] == job_id
    assert record.progress.fraction == 1.0
    assert (out / REPORT_FILE).read_bytes() == published  # not recomputed


def test_a_job_written_but_never_enqueued_is_swept_up(plain_stack, service_pair, local_root):
    """The API died between writing the record and enqueueing it: a worker enqueues it."""
    jobs = Jobs(plain_stack)
    spec = {
        "base": str(service_pair.base),
        "finetuned": str(service_pair.finetuned),
        "output": str(local_root / "swept" / "out"),
    }
    job_id = jobs.submit(spec, enqueue=False)
    assert not jobs.store.is_enqueued(job_id)
    record = jobs.wait(job_id, timeout=30)
    assert record.status == "succeeded" and record.attempts == 1
    assert jobs.store.is_enqueued(job_id)


def test_engine_reruns_of_a_job_clean_up_and_respect_other_outputs(service_pair, tmp_path):
    out = tmp_path / "out"
    spec = JobSpec(
        base=str(service_pair.base), finetuned=str(service_pair.finetuned), output=str(out)
    )
    # A killed attempt of job A left a staging dir; another job's staging dir stays.
    leftover = tmp_path / f"{job_staging_prefix(out, 'a' * 32)}dead01"
    other = tmp_path / f"{job_staging_prefix(out, 'b' * 32)}live02"
    for path in (leftover, other):
        path.mkdir()
        (path / "model-00001.safetensors").write_bytes(b"partial")
    first = run_prune(spec, job_id="a" * 32)
    assert first.report["job_id"] == "a" * 32
    assert not leftover.exists() and other.exists()
    # Again with the same job: done already. With another job: the output is someone else's.
    again = run_prune(spec, job_id="a" * 32)
    assert again.report == json.loads((out / REPORT_FILE).read_text())
    with pytest.raises(OutputExists):
        run_prune(spec, job_id="c" * 32)
    with pytest.raises(OutputExists):
        run_prune(spec)  # the CLI: no job id, no special case
