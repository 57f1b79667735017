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
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from app.core.sealing import SEALED_PREFIX, UnsealError
from app.core.unicode_text import scrub_surrogates
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

    @field_validator("secret")
    @classmethod
    def _not_sealed_looking(cls, secret: SecretStr | None) -> SecretStr | None:
        # A stored value with this prefix is read as sealed (app/core/sealing.py).
        if secret is not None and secret.get_secret_value().startswith(SEALED_PREFIX):
            raise ValueError(f"a secret may not start with {SEALED_PREFIX!r}")
        return secret


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


REDACTED = "REDACTED"


def redacted_url(url: str) -> str:
    """A webhook URL as records and logs show it: scheme://host/path, each query value (often a
    token) replaced by REDACTED, any user info and fragment dropped. The full URL is stored and
    used for delivery only."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return REDACTED
    if ":" in host:
        host = f"[{host}]"
    query = "&".join(
        f"{item.split('=', 1)[0]}={REDACTED}" if "=" in item else REDACTED
        for item in parts.query.split("&")
        if item
    )
    return urlunsplit((parts.scheme, host + port, parts.path, query, ""))


class WebhookInfo(BaseModel):
    url: str = Field(
        description="Where the job's end is POSTed; query values are shown as REDACTED."
    )
    signed: bool
    deliveries: list[WebhookDelivery] = Field(default_factory=list)
    # The URL as submitted: deliveries go there; it is never serialized.
    _delivery_url: str = PrivateAttr(default="")
    # Why there is no URL to deliver to (it is sealed with a key this process lacks).
    _undeliverable: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _redact(self) -> WebhookInfo:
        if not self._delivery_url:
            self._delivery_url = self.url
        self.url = redacted_url(self.url)
        return self

    def cannot_deliver(self, reason: str) -> None:
        """The stored URL could not be unsealed: `url` shows a placeholder, not a target."""
        self._undeliverable = reason
        self._delivery_url = ""

    @property
    def delivery_url(self) -> str:
        """The full URL (with its query) that the worker delivers to; UnsealError if the stored
        URL could not be unsealed (never a placeholder to POST to)."""
        if self._undeliverable is not None:
            raise UnsealError(self._undeliverable)
        return self._delivery_url


def _stored_spec_schema(schema: dict[str, Any]) -> None:
    """The document states that a stored spec may predate today's rules (see `spec`), so an
    old record's spec is documented rather than a schema violation."""
    schema.setdefault("anyOf", []).append(
        {
            "type": "object",
            "title": "StoredSpec",
            "description": "A spec stored under earlier rules that no longer validates.",
        }
    )


class JobRecord(BaseModel):
    id: str
    status: JobStatus
    queue: QueueName
    kind: JobKind = Field(
        default="prune",
        description='"prune" (POST /v1/jobs: spec is a JobSpec) or "evaluation" '
        "(POST /v1/evaluations: spec is an EvaluationJobSpec).",
    )
    spec: JobSpec | EvaluationJobSpec = Field(
        description="What the job runs, as stored at submission. A record stored before a rule "
        "was tightened shows its spec as stored, even where it no longer validates (the worker "
        "then fails the job with invalid_spec instead of running it).",
        json_schema_extra=_stored_spec_schema,
    )
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

    # Why the stored spec no longer validates (see _spec_of_kind); None for a valid spec.
    _spec_error: str | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _read_stored(cls, data: Any, handler: ModelWrapValidatorHandler[JobRecord]) -> JobRecord:
        # A stored record always reads, so one bad record cannot fail a tenant's list: strings
        # that cannot be encoded (lone surrogates, stored before the API refused them) are
        # scrubbed, and a spec that no longer validates (a rule tightened since it was stored)
        # is kept as stored and flagged in `spec_error`, which the worker refuses to run.
        # The kind picks the spec's model, so a spec is never validated against the other
        # kind's fields (and a bad one fails with that kind's own errors).
        spec_error = None
        if isinstance(data, dict):
            data = scrub_surrogates(data)
            if isinstance(data.get("spec"), dict):
                model = EvaluationJobSpec if data.get("kind") == "evaluation" else JobSpec
                try:
                    spec = model.model_validate(data["spec"])
                except ValidationError as exc:
                    spec_error = _validation_summary(exc)
                    known = {k: v for k, v in data["spec"].items() if k in model.model_fields}
                    spec = model.model_construct(**known)
                data = {**data, "spec": spec}
        record = handler(data)
        record._spec_error = spec_error
        return record

    @model_validator(mode="after")
    def _kind_matches_spec(self) -> JobRecord:
        expected = EvaluationJobSpec if self.kind == "evaluation" else JobSpec
        if not isinstance(self.spec, expected):
            raise ValueError(f"spec: a {self.kind} job carries a {expected.__name__}")
        return self

    @property
    def spec_error(self) -> str | None:
        """Why the stored spec fails today's validation; None when it is valid (runnable)."""
        return self._spec_error


def _validation_summary(exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first.get("loc", ()))
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{field or 'spec'}: {first.get('msg', 'invalid')}{more}"


WebhookEventType = Literal["job.succeeded", "job.failed", "job.cancelled"]


class WebhookEvent(BaseModel):
    """The body POSTed to a job's webhook when it ends (Standard Webhooks: type, timestamp,
    data), signed with `webhook-id`, `webhook-timestamp` and `webhook-signature` headers."""

    type: WebhookEventType
    timestamp: datetime
    data: JobRecord
