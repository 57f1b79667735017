"""/v1/jobs: submit, read, list, cancel, report.

Jobs of both kinds (prune, and evaluation from /v1/evaluations) are read, listed, followed and
cancelled here.

Routes that talk to Redis are plain `def`s: FastAPI runs them in its threadpool, where the sync
JobStore (Lua scripts, one pooled connection per thread) and Celery's `send_task` belong. The
event stream, which waits for minutes, is async (routes/events.py).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Response
from pydantic import BaseModel, Field

from app.api import examples
from app.api.deps import ACCEPTED_HEADERS, IdempotencyKeyHeader, ServicesDep, TenantDep, accepted
from app.api.strict_json import StrictJSONRoute
from app.api.submission import normalize_idempotency_key
from app.core.problems import ProblemError, problem_responses
from app.jobs.records import JobRecord, JobRequest, JobStatus
from worker.io.strict_json import with_finite_note
from worker.spec import JobKind

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=StrictJSONRoute)

# Ids are lowercase hex (app.jobs.store.new_job_id); anything else is simply not found.
JOB_ID_RE = re.compile(r"^[0-9a-f]{1,64}$")

JobId = Annotated[
    str,
    Path(
        description="The job id from POST /v1/jobs.",
        examples=[examples.JOB_ID],
    ),
]


class JobList(BaseModel):
    jobs: list[JobRecord] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


def job_not_found(job_id: str) -> ProblemError:
    """The 404 for unknown ids and other tenants' jobs alike (the id is echoed, shortened)."""
    shown = job_id if len(job_id) <= 64 else job_id[:64] + "..."
    return ProblemError(404, "job_not_found", f"No job {shown} for this API key.")


def _record_example(record: dict[str, Any], summary: str) -> dict[str, Any]:
    return {"summary": summary, "value": record}


def _owned(services: ServicesDep, tenant: str, job_id: str) -> JobRecord:
    """The tenant's job, or 404. Other tenants' jobs are indistinguishable from unknown ids."""
    record = services.store.get(job_id, tenant) if JOB_ID_RE.match(job_id) else None
    if record is None:
        raise job_not_found(job_id)
    return record


@router.post(
    "",
    status_code=202,
    response_model=JobRecord,
    summary="Submit a pruning job",
    description=(
        "Validates the JobSpec, checks local paths against FAPM_LOCAL_ROOTS and the webhook URL "
        "against the SSRF rules, writes the job and hands it to a worker queue (`gpu` for "
        "`device: cuda`, `cpu` for `device: cpu`; `auto` goes to `gpu` while a GPU worker is "
        "alive). Answers 202 with the queued job and a `Location` header.\n\n"
        "**Idempotency-Key** (optional, per tenant, remembered for FAPM_IDEMPOTENCY_TTL_SECONDS, "
        "24 h by default): the same key with the same body answers 202 with the first job "
        "(`Idempotent-Replayed: true`); with another body 422; while the first request is still "
        "being enqueued 409."
    ),
    responses={
        202: {
            "description": "Accepted: the job is queued.",
            "headers": ACCEPTED_HEADERS,
            "content": {
                "application/json": {
                    "examples": {"queued": _record_example(examples.QUEUED_RECORD, "Queued")}
                }
            },
        },
        **problem_responses(400, 401, 409, 413, 422, 429, 503),
    },
)
def submit_job(
    services: ServicesDep,
    tenant: TenantDep,
    response: Response,
    job: Annotated[JobRequest, Body(openapi_examples=examples.JOB_REQUEST_EXAMPLES)],
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobRecord:
    key = normalize_idempotency_key(idempotency_key)
    return accepted(services.submitter.submit(tenant, job, key), response)


@router.get(
    "",
    response_model=JobList,
    summary="List this tenant's jobs",
    description="Newest first. `cursor` pages stay stable while new jobs arrive.",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "jobs": [examples.RUNNING_RECORD],
                        "next_cursor": examples.JOB_ID,
                    }
                }
            }
        },
        **problem_responses(401, 422),
    },
)
def list_jobs(
    services: ServicesDep,
    tenant: TenantDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    kind: Annotated[
        JobKind | None,
        Query(description="Only jobs of this kind (prune, or evaluation from /v1/evaluations)."),
    ] = None,
    label: Annotated[
        str | None,
        Query(
            description="Only jobs with this label, as `key=value`.",
            pattern=r"^[^=]+=.*$",
            examples=["team=nlp"],
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="Page size.")] = 50,
    cursor: Annotated[
        str | None,
        Query(
            description="`next_cursor` of the previous page (a job id). The page holds the jobs "
            "created before that job, even if it has expired since.",
            pattern=JOB_ID_RE.pattern,
        ),
    ] = None,
) -> JobList:
    label_pair = tuple(label.split("=", 1)) if label else None
    jobs, next_cursor = services.store.list(
        tenant,
        status=status,
        label=label_pair,  # type: ignore[arg-type]
        limit=limit,
        cursor=cursor,
        kind=kind,
    )
    return JobList(jobs=jobs, next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    response_model=JobRecord,
    summary="Get a job",
    responses={
        200: {
            "content": {
                "application/json": {
                    "examples": {
                        "running": _record_example(examples.RUNNING_RECORD, "Running"),
                        "succeeded": _record_example(examples.SUCCEEDED_RECORD, "Succeeded"),
                        "failed": _record_example(examples.FAILED_RECORD, "Failed"),
                    }
                }
            }
        },
        **problem_responses(401, 404, 422),
    },
)
def get_job(services: ServicesDep, tenant: TenantDep, job_id: JobId) -> JobRecord:
    return _owned(services, tenant, job_id)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobRecord,
    summary="Cancel a job",
    description=(
        "A queued job is cancelled at once and never starts (`status: cancelled`). A running "
        "job gets `cancel_requested: true`, stops at the next tensor, removes its staging "
        "output and ends `cancelled`; follow it on the events stream. A finished job: 409."
    ),
    responses={
        202: {
            "content": {
                "application/json": {
                    "examples": {
                        "cancelled": _record_example(examples.CANCELLED_RECORD, "Was queued"),
                        "requested": _record_example(
                            {**examples.RUNNING_RECORD, "cancel_requested": True}, "Was running"
                        ),
                    }
                }
            }
        },
        **problem_responses(401, 404, 409, 422),
    },
)
def cancel_job(services: ServicesDep, tenant: TenantDep, job_id: JobId) -> JobRecord:
    _owned(services, tenant, job_id)
    outcome = services.store.request_cancel(job_id)
    record = services.store.get(job_id, tenant)
    if outcome == "missing" or record is None:
        raise job_not_found(job_id)
    if outcome == "finished":
        raise ProblemError(
            409,
            "job_finished",
            f"Job {job_id} already ended with status {record.status}; nothing to cancel.",
            job_status=record.status,
        )
    return record


@router.get(
    "/{job_id}/report",
    summary="The job's full pruning report",
    description="The pruning_report.json the worker wrote: per-tensor statistics, shards, "
    "timings. 404 until the job has succeeded.",
    responses={
        200: {
            "description": "The report (free-form JSON).",
            "content": {
                "application/json": {
                    "schema": {"type": "object", "additionalProperties": True},
                }
            },
        },
        **problem_responses(401, 404, 422),
    },
)
def get_report(services: ServicesDep, tenant: TenantDep, job_id: JobId) -> dict[str, Any]:
    record = _owned(services, tenant, job_id)
    report = services.store.report(job_id)
    if report is None:
        raise ProblemError(
            404,
            "report_not_ready",
            f"Job {job_id} has no report yet (status {record.status}).",
            job_status=record.status,
        )
    # Strict JSON (a report stored before non-finite numbers were written as null may hold NaN).
    return with_finite_note(report)
