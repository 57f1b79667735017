"""What a job looks like to API clients, webhook receivers and the worker.

`JobRequest` is the body of POST /v1/jobs: the JobSpec fields plus webhook and labels.
`EvaluationRequest` is the body of POST /v1/evaluations: the EvaluationJobSpec fields plus the
same webhook and labels. Both create a job in the one store, so status, listing, events, cancel,
webhooks, quotas, idempotency and tenant isolation are the same for both; the record's `kind`
("prune" or "evaluation") says which spec it carries. `JobRecord` is what GET /v1/jobs/{id}
returns and what a webhook delivers. Secrets (the webhook's signing secret) are accepted in
requests and never appear in a record.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, SecretStr, model_validator

from worker.spec import EvaluationJobSpec, JobKind, JobSpec

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


class EvaluationRequest(EvaluationJobSpec):
    """POST /v1/evaluations: an EvaluationJobSpec plus the same webhook and labels as a job."""

    webhook: WebhookRequest | None = None
    labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description="Free-form key/value labels; GET /v1/jobs filters on them (label=key=value).",
    )

    def spec(self) -> EvaluationJobSpec:
        return EvaluationJobSpec.model_validate(self.model_dump(exclude={"webhook", "labels"}))


AnyJobRequest = JobRequest | EvaluationRequest


def request_kind(request: AnyJobRequest) -> JobKind:
    return "evaluation" if isinstance(request, EvaluationRequest) else "prune"


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
        description="Where the model was published; null when nothing was (an evaluation "
        'job never publishes; a failed sparsity "auto" search still reports its points).'
    )
    report: dict = Field(
        description="Summary of pruning_report.json: totals, shards, seconds, and for "
        "evaluated jobs `evaluation` (every measured point, the chosen one). For an "
        "evaluation job: `evaluation` {references, points (the model's), note, ...}."
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
    kind: JobKind = Field(
        default="prune",
        description='"prune" (POST /v1/jobs: spec is a JobSpec) or "evaluation" '
        "(POST /v1/evaluations: spec is an EvaluationJobSpec).",
    )
    spec: JobSpec | EvaluationJobSpec
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

    @model_validator(mode="before")
    @classmethod
    def _spec_of_kind(cls, data: Any) -> Any:
        # The kind picks the spec's model, so a spec is never validated against the other
        # kind's fields (and a bad one fails with that kind's own errors).
        if isinstance(data, dict) and isinstance(data.get("spec"), dict):
            model = EvaluationJobSpec if data.get("kind") == "evaluation" else JobSpec
            data = {**data, "spec": model.model_validate(data["spec"])}
        return data

    @model_validator(mode="after")
    def _kind_matches_spec(self) -> JobRecord:
        expected = EvaluationJobSpec if self.kind == "evaluation" else JobSpec
        if not isinstance(self.spec, expected):
            raise ValueError(f"spec: a {self.kind} job carries a {expected.__name__}")
        return self


WebhookEventType = Literal["job.succeeded", "job.failed", "job.cancelled"]


class WebhookEvent(BaseModel):
    """The body POSTed to a job's webhook when it ends (Standard Webhooks: type, timestamp,
    data), signed with `webhook-id`, `webhook-timestamp` and `webhook-signature` headers."""

    type: WebhookEventType
    timestamp: datetime
    data: JobRecord
