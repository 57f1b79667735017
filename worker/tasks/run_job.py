"""`fapm.run_job(job_id)`: take the job's lease, run the engine, write the outcome.

One task for both kinds of job: the record's `kind` picks the work ("prune": the engine, with
the evaluation stage when the spec asks for it; "evaluation": worker/evaluation/standalone.py,
which measures and publishes nothing). Lease, progress, cancellation, outcome and webhook are
the same for both.

The task is thin: the JobSpec comes from the job record in Redis (the message carries only the
id), the engine does the work (worker/engine/pipeline.py), and the record gets the result or a
stable error code. Guarantees, with Celery's acks_late and the Redis lease:

- one run at a time: `store.start` hands out one lease; a second delivery of the same job while
  the lease is held retries later, and takes over only once the holder is gone;
- re-delivery is safe: the engine stages under a name derived from the job id (a killed
  attempt's leftovers are removed) and publishes with one rename; if the job had published
  before its worker died, the re-run finds its own report there and just records success;
- cancellation is a flag in Redis checked between tensors (never revoke(terminate=True)).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import redis
from celery import Task

from app.core.config import Settings, get_settings
from app.core.locations import LocationsFileError, check_job_locations, readable_roots
from app.jobs.records import TERMINAL_STATUSES
from app.jobs.store import JobStore, Lease
from worker.celery_app import RUN_JOB_TASK, celery_app, enqueue_webhook
from worker.errors import FapmError, InvalidLocation, JobCancelled
from worker.evaluation.job import run_job_spec
from worker.evaluation.standalone import run_evaluation_job
from worker.heartbeat import LeaseKeeper
from worker.io.source import confine_local_reads
from worker.spec import EvaluationJobSpec, JobSpec
from worker.tasks.progress import ProgressReporter
from worker.tasks.store import job_store
from worker.webhooks import delivery_ended, webhook_id_for

log = logging.getLogger(__name__)

REDIS_RETRY_SECONDS = 5.0
# Report keys that make up the record's result summary (the full report: GET .../report).
SUMMARY_KEYS = (
    "job_id",
    "kind",
    "totals",
    "output",
    "seconds",
    "implementation",
    "inputs",
    "evaluation",
)


class LeaseLost(Exception):
    """Another worker may own the job now: this attempt stops without writing the record."""


@celery_app.task(name=RUN_JOB_TASK, bind=True, max_retries=None)
def run_job(self: Task, job_id: str) -> str:
    settings = get_settings()
    store = job_store()
    try:
        pause_for_test("taken", job_id)
        store.note_running(job_id)  # before start: a death right after start is still found
        pause_for_test("noted", job_id)
        lease = store.start(job_id, settings.lease_seconds)
    except redis.RedisError as exc:
        # Redis away for a moment: failing here would ack the message and strand the job.
        log.warning("job %s: Redis unavailable at start (%s); retrying", job_id, exc)
        raise self.retry(countdown=REDIS_RETRY_SECONDS) from None
    if lease == "busy":
        # Another worker holds the lease (this is a duplicate delivery). Look again in half a
        # lease: if that worker died, its lease will have expired and this delivery takes over.
        log.info("job %s is running elsewhere; checking again later", job_id)
        raise self.retry(countdown=max(1.0, settings.lease_seconds / 2))
    if lease == "missing":
        log.warning("job %s has no record (expired or never written); dropped", job_id)
        store.forget_running(job_id)
        return "missing"
    if isinstance(lease, str):
        # Finished (or cancelled while queued): never start. Its webhook may still be owed if
        # the worker that finished it died before queueing the delivery.
        store.forget_running(job_id)
        dispatch_webhook(store, job_id)
        return lease

    try:
        status = execute(store, settings, lease)
    except LeaseLost:
        raise self.retry(countdown=max(1.0, settings.lease_seconds / 2)) from None
    store.forget_running(job_id)
    pause_for_test("finished", job_id)
    dispatch_webhook(store, job_id)
    return status


def execute(store: JobStore, settings: Settings, lease: Lease) -> str:
    """Run one attempt of a leased job to a terminal status; returns the status."""
    job_id = lease.job_id
    started = time.monotonic()
    try:
        record = store.get(job_id)
        spec = record.spec
        kind = record.kind
    except Exception:
        log.exception("job %s: unreadable job record", job_id)
        store.finish(job_id, "failed", lease=lease, error=_internal_error(job_id))
        return "failed"
    if record.spec_error is not None:
        # Stored before a rule it breaks was added (the record reads, see JobRecord): never run.
        message = f"the job's spec fails this version's validation: {record.spec_error}"
        store.finish(
            job_id, "failed", lease=lease, error={"code": "invalid_spec", "message": message}
        )
        return "failed"
    if isinstance(spec, EvaluationJobSpec):
        log.info("job %s: attempt %d, evaluation of %s", job_id, lease.attempt, spec.model)
        reporter = ProgressReporter(
            store, lease, "tensor", settings.progress_interval_seconds, kind=kind
        )
    else:
        log.info("job %s: attempt %d, %s %s", job_id, lease.attempt, spec.method, spec.output)
        reporter = ProgressReporter(
            store,
            lease,
            spec.scope,
            settings.progress_interval_seconds,
            evaluate=spec.evaluate is not None,
            method=spec.method,
            weights=spec.prune == "weights",
        )
    with LeaseKeeper(store, lease, settings.lease_seconds) as keeper:
        pause_for_test("started", job_id)

        def should_cancel() -> bool:
            if keeper.lost:
                return True
            try:
                return store.cancel_requested(job_id)
            except redis.RedisError:  # look again at the next tensor; the lease keeper
                return False  # stops the job if Redis stays away for a whole lease

        try:
            check_locations(spec, settings, store.tenant_of(job_id) or "")
            output: str | None
            if isinstance(spec, EvaluationJobSpec):
                # Measures only: nothing is published, so the result has no output.
                output = None
                report = run_evaluation_job(spec, reporter, should_cancel, job_id=job_id)
            else:
                result = run_job_spec(spec, reporter, should_cancel, job_id=job_id)
                output, report = result.output, result.report
        except JobCancelled as exc:
            if keeper.lost:
                raise LeaseLost from None
            outcome = {"status": "cancelled", "error": {"code": exc.code, "message": exc.message}}
        except FapmError as exc:
            outcome = {"status": "failed", "error": {"code": exc.code, "message": exc.message}}
            report = getattr(exc, "report", None)
            if report is not None:  # skill_floor_unreachable: every measured point, no output
                outcome["result"] = {"output": None, "report": report}
                outcome["report"] = report
        except Exception:
            log.exception("job %s: unexpected error", job_id)
            outcome = {"status": "failed", "error": _internal_error(job_id)}
        else:
            summary = {key: report[key] for key in SUMMARY_KEYS if key in report}
            outcome = {
                "status": "succeeded",
                # Where it was published: for the Hub, the commit (hf://org/name@sha).
                "result": {"output": output, "report": summary},
                "report": report,
                "progress": reporter.final(),
            }
        if keeper.lost:
            raise LeaseLost
        if not store.finish(job_id, lease=lease, **outcome):
            # The lease expired under us (or the record was finished elsewhere): the job's
            # other holder writes the outcome.
            log.warning("job %s: could not record %s (lease lost)", job_id, outcome["status"])
            raise LeaseLost
    seconds = time.monotonic() - started
    if outcome["status"] == "succeeded":
        store.observe_duration(seconds, reporter.bytes_read)
    log.info("job %s: %s in %.1f s", job_id, outcome["status"], seconds)
    return outcome["status"]


def check_locations(spec: JobSpec | EvaluationJobSpec, settings: Settings, tenant: str) -> None:
    """The API's location check again, as the worker sees the paths (a symlink under a root can
    change before the job runs), for the record's tenant (app/core/locations.py); then confine
    every local file the job opens to that tenant's roots (worker/io/source.py)."""
    try:
        problems = check_job_locations(spec, tenant, settings)
    except LocationsFileError as exc:
        raise FapmError(str(exc), code="locations_unavailable") from None
    if problems:
        raise InvalidLocation("; ".join(f"{p.field}: {p.message}" for p in problems))
    confine_local_reads(readable_roots(settings, tenant))


def _internal_error(job_id: str) -> dict:
    # No exception text: it may quote paths, URLs or credentials. The worker log has it all.
    return {
        "code": "internal_error",
        "message": f"the worker hit an unexpected error running job {job_id}; "
        "the worker log has the details",
    }


def dispatch_webhook(store: JobStore, job_id: str, *, again: bool = False) -> None:
    """Queue the end-of-job webhook of a finished job. From run_job, once: a duplicate run_job
    message of a finished job queues nothing more once the delivery was queued. From the
    heartbeat sweeper (`again`), whenever the job's owed-webhook stamp went stale: the delivery
    was never queued (the worker died right after `finish`) or was lost on the way (its worker
    died mid-POST or holding a retry's countdown); the delivery task continues the schedule
    from the record, with the same webhook-id for the receiver to deduplicate. A job with no
    webhook to deliver, or whose delivery has ended, is no longer owed."""
    record = store.get(job_id)
    if record is not None and record.status not in TERMINAL_STATUSES:
        return
    if record is None or record.webhook is None or delivery_ended(record):
        store.webhook_settled(job_id)
        return
    if not again and store.webhook_dispatched(job_id):
        return
    # Before the enqueue: the delivery may end (and settle) before this call would return.
    timeout = get_settings().webhook_timeout_seconds
    store.webhook_expected_by(job_id, time.time() + timeout, dispatched=True)
    enqueue_webhook(job_id, f"job.{record.status}", webhook_id_for(job_id))


# Fault injection for the recovery tests (tests/service/test_worker_recovery.py), off unless the
# worker's environment sets FAPM_TEST_PAUSE_DIR.
def pause_for_test(point: str, job_id: str) -> None:
    """If FAPM_TEST_PAUSE_DIR/<job>.pause names `point`, write FAPM_TEST_PAUSE_DIR/<point>-<job>
    (this process's pid) and sleep until killed, once per job: the worker that recovers the job
    runs through. Points: "taken" (the message is taken, the job not yet noted running),
    "noted" (noted, not yet started), "started" (leased, before the engine), "finished" (the
    outcome is recorded, the webhook not yet queued)."""
    directory = os.environ.get("FAPM_TEST_PAUSE_DIR")
    if not directory:
        return
    plan = Path(directory) / f"{job_id}.pause"
    if not plan.exists() or plan.read_text().strip() != point:
        return
    try:
        with (Path(directory) / f"{point}-{job_id}").open("x") as marker:
            marker.write(str(os.getpid()))
    except FileExistsError:
        return
    log.warning("job %s: paused at %s for a test (FAPM_TEST_PAUSE_DIR)", job_id, point)
    while True:
        time.sleep(3600)
