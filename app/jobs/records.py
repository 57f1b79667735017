"""What a job looks like to API clients, webhook receivers and the worker.

`JobRequest` is the body of POST /v1/jobs: the JobSpec fields plus webhook and labels. `JobRecord`
is what GET /v1/jobs/{id} returns and what a webhook delivers. Secrets (the webhook's signing
secret) are accepted in requests and never appear in a record.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, SecretStr

from worker.spec import JobSpec

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE_STATUSES: tuple[str, ...] = ("queued", "running")
TERMINAL_STATUSES: tuple[str, ...] = ("succeeded", "failed", "cancelled")
QueueName = Literal["cpu", "gpu"]


class WebhookRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: HttpUrl = Field(description="Receives the job record when the job ends.")
    secret: SecretStr | None = Field(
        default=None,
        description="Standard Webhooks signing secret (`whsec_<base64>` or any string); "
        "without one the delivery is unsigned.",
    )


class JobRequest(JobSpec):
    """POST /v1/jobs: a JobSpec plus where to report and how to find the job again."""

    webhook: WebhookRequest | None = None
    labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description="Free-form key/value labels; GET /v1/jobs filters on them (label=key=value).",
    )

    def spec(self) -> JobSpec:
        return JobSpec.model_validate(self.model_dump(exclude={"webhook", "labels"}))


class JobProgress(BaseModel):
    stage: str = "queued"
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    fraction: float = Field(default=0.0, ge=0.0, le=1.0, description="Monotone; 1.0 at success.")
    eta_seconds: float | None = None


class JobError(BaseModel):
    code: str = Field(description="Stable, machine-readable (e.g. source_not_found).")
    message: str


class JobResult(BaseModel):
    output: str | None = Field(
        description="Where the model was published; null when nothing was (a failed "
        'sparsity "auto" search still reports its points).'
    )
    report: dict = Field(
        description="Summary of pruning_report.json: totals, shards, seconds, and for "
        "evaluated jobs `evaluation` (every measured point, the chosen one)."
    )


class WebhookDelivery(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None = None
    error: str | None = None
    delivered: bool = False
    next_attempt_at: datetime | None = None


class WebhookInfo(BaseModel):
    url: str
    signed: bool
    deliveries: list[WebhookDelivery] = Field(default_factory=list)


class JobRecord(BaseModel):
    id: str
    status: JobStatus
    queue: QueueName
    spec: JobSpec
    labels: dict[str, str] = Field(default_factory=dict)
    progress: JobProgress = Field(default_factory=JobProgress)
    result: JobResult | None = None
    error: JobError | None = None
    webhook: WebhookInfo | None = None
    cancel_requested: bool = False
    attempts: int = Field(default=0, description="How many times a worker started the job.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


WebhookEventType = Literal["job.succeeded", "job.failed", "job.cancelled"]


class WebhookEvent(BaseModel):
    """The body POSTed to a job's webhook when it ends (Standard Webhooks: type, timestamp,
    data), signed with `webhook-id`, `webhook-timestamp` and `webhook-signature` headers."""

    type: WebhookEventType
    timestamp: datetime
    data: JobRecord
