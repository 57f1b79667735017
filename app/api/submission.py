"""The one path by which a job enters the system (POST /v1/jobs, POST /v1/evaluations and the
Hub webhook). Both kinds of job take the same steps; only the spec they carry differs.

Order matters for "nothing lost, nothing doubled": the record is written first (one Lua call that
also takes the quota slot, the Idempotency-Key and the `pending-enqueue` mark), then the task is
handed to Celery, then the mark is dropped. A crash between the steps leaves a queued record that
the workers' sweeper enqueues; it never leaves a task without a record.

Cost per submission: the location checks (a few `stat`s; no DNS for allow-listed webhook hosts),
one Lua call, one `send_task`, one ZREM and one HGETALL for the answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from app.core.config import Settings
from app.core.locations import LocationsFileError, check_job_locations
from app.core.netguard import check_webhook_url
from app.core.problems import FieldError, ProblemError
from app.jobs.records import AnyJobRequest, JobRecord, request_kind
from app.jobs.routing import QueueRouter
from app.jobs.store import PREFIX, JobStore, new_job_id
from worker.celery_app import enqueue_job

log = logging.getLogger("app.submission")

# Drop an Idempotency-Key only if it still names the given job (compare-and-delete).
_FORGET_IDEMPOTENCY = """
local value = redis.call('GET', KEYS[1])
if value and cjson.decode(value).job_id == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Submitted:
    record: JobRecord
    replayed: bool  # an earlier job under the same Idempotency-Key was returned


def fingerprint(request: AnyJobRequest) -> str:
    """SHA-256 of the request's canonical JSON (defaults filled in, keys sorted).

    The webhook secret enters as its own SHA-256: a retry with another secret is another request,
    yet no secret is kept in the idempotency record. An evaluation's kind enters too, so one
    Idempotency-Key reused across the two endpoints is a different body (422); a prune request's
    fingerprint is what it was before evaluation jobs existed (keys in flight stay valid).
    """
    data = request.model_dump(mode="json")
    kind = request_kind(request)
    if kind != "prune":
        data["kind"] = kind
    if request.webhook is not None and request.webhook.secret is not None:
        secret = request.webhook.secret.get_secret_value().encode("utf-8")
        data["webhook"]["secret"] = "sha256:" + hashlib.sha256(secret).hexdigest()
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def normalize_idempotency_key(raw: str | None) -> str | None:
    """The header is a structured-field string (`"abc"`), but bare tokens are accepted too.
    400 for empty, overlong or non-printable keys (they become part of a Redis key)."""
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key or len(key) > 255 or not all(33 <= ord(c) < 127 for c in key):
        raise ProblemError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 printable ASCII characters without spaces.",
        )
    return key


class Submitter:
    def __init__(
        self,
        store: JobStore,
        router: QueueRouter,
        settings: Settings,
        enqueue: Callable[[str, str], None] = enqueue_job,
    ) -> None:
        self.store = store
        self.router = router
        self.settings = settings
        self.enqueue = enqueue
        self._forget = store.redis.register_script(_FORGET_IDEMPOTENCY)

    def check_locations(self, tenant: str, request: AnyJobRequest) -> None:
        """422 unless every location is one `tenant` may use (app/core/locations.py: known
        schemes, local paths under its roots after `..` and symlinks, its S3 prefixes and Hub
        namespaces, an output apart from roots and inputs) and the webhook URL passes the SSRF
        rules; 503 if the tenant locations file is broken."""
        try:
            problems = check_job_locations(request, tenant, self.settings)
        except LocationsFileError as exc:
            log.error("tenant locations unusable: %s", exc)
            raise ProblemError(
                503,
                "locations_unavailable",
                "The server's tenant locations file cannot be read; retry later.",
                headers={"Retry-After": str(self.settings.retry_after_seconds)},
            ) from None
        errors = [FieldError(field=p.field, location="body", message=p.message) for p in problems]
        if request.webhook is not None:
            try:
                check_webhook_url(str(request.webhook.url), self.settings.webhook_allow)
            except ValueError as exc:
                errors.append(FieldError(field="webhook.url", location="body", message=str(exc)))
        if errors:
            raise ProblemError(
                422,
                "invalid_location",
                "; ".join(f"{e.field}: {e.message}" for e in errors),
                title="A location in the request is not allowed",
                errors=errors,
            )

    def submit(
        self,
        tenant: str,
        request: AnyJobRequest,
        idempotency_key: str | None = None,
        *,
        replay_any_body: bool = False,
    ) -> Submitted:
        """Create and enqueue the job, or return the earlier job of the same Idempotency-Key.

        `replay_any_body` (the Hub webhook): a repeated key always answers with the earlier job,
        even if it is not enqueued yet or the rule changed since.
        """
        self.check_locations(tenant, request)
        body_print = fingerprint(request) if idempotency_key else None
        job_id = new_job_id()
        queue = self.router.queue_for(request)
        webhook = request.webhook
        outcome = self.store.create(
            job_id=job_id,
            tenant=tenant,
            queue=queue,
            spec_json=request.model_dump(mode="json", exclude={"webhook", "labels"}),
            labels=request.labels,
            webhook_url=str(webhook.url) if webhook else None,
            webhook_secret=(
                webhook.secret.get_secret_value() if webhook and webhook.secret else None
            ),
            max_active=self.settings.max_active_jobs_per_tenant,
            idempotency_key=idempotency_key,
            fingerprint=body_print,
            idempotency_ttl=self.settings.idempotency_ttl_seconds,
            kind=request_kind(request),
        )
        if outcome.kind == "quota":
            limit = self.settings.max_active_jobs_per_tenant
            raise ProblemError(
                429,
                "quota_exceeded",
                f"This tenant already has {limit} queued or running jobs (the limit); "
                "retry when one has finished.",
                headers={"Retry-After": str(self.settings.retry_after_seconds)},
                limit=limit,
            )
        if outcome.kind == "idempotent":
            return self._replay(
                tenant, outcome.job_id or "", outcome.fingerprint, body_print, replay_any_body
            )
        try:
            self.enqueue(job_id, queue)
        except Exception as exc:
            log.error("enqueue of job %s to %s failed: %r", job_id, queue, exc)
            self.store.fail(job_id, "enqueue_failed", "The task queue did not accept the job.")
            self.store.mark_enqueued(job_id)  # nothing left for the sweeper to send
            if idempotency_key:
                # The client's retry with the same key should create a fresh job, not replay
                # this failed one.
                self._forget(keys=[f"{PREFIX}idem:{tenant}:{idempotency_key}"], args=[job_id])
            raise ProblemError(
                503,
                "enqueue_failed",
                "The task queue is not reachable; the job was not started. Retry later.",
                headers={"Retry-After": str(self.settings.retry_after_seconds)},
                job_id=job_id,
            ) from exc
        self.store.mark_enqueued(job_id)
        record = self.store.get(job_id)
        assert record is not None  # written above; records expire after days, not ms
        log.info("job %s created for tenant %s on queue %s", job_id, tenant, queue)
        return Submitted(record, replayed=False)

    def _replay(
        self,
        tenant: str,
        job_id: str,
        earlier_print: str | None,
        body_print: str | None,
        replay_any_body: bool,
    ) -> Submitted:
        if not replay_any_body and earlier_print != body_print:
            raise ProblemError(
                422,
                "idempotency_key_reused",
                "This Idempotency-Key was used for a different request body; use a new key "
                "for a new job.",
                job_id=job_id,
            )
        if not replay_any_body and not self.store.is_enqueued(job_id):
            raise ProblemError(
                409,
                "idempotency_key_in_flight",
                "The first request with this Idempotency-Key is still being processed; retry "
                "shortly.",
                headers={"Retry-After": "1"},
            )
        record = self.store.get(job_id, tenant)
        if record is None:
            raise ProblemError(
                409,
                "idempotency_job_gone",
                "The job this Idempotency-Key named has expired; retry with a new key.",
            )
        return Submitted(record, replayed=True)
