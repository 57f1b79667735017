"""POST /v1/hooks/mlflow: an MLflow Model Registry event starts the job a rule maps it to.

MLflow (3.3+) signs each delivery as mlflow/webhooks/delivery.py does: `X-MLflow-Signature:
v1,<base64 HMAC-SHA256>` with the webhook's secret (its UTF-8 bytes) over
`"{X-MLflow-Delivery-Id}.{X-MLflow-Timestamp}.{body}"`, the timestamp in Unix seconds. Before the
body is parsed, this endpoint answers 401 to a delivery that is unsigned, wrongly signed, stamped
further than FAPM_MLFLOW_WEBHOOK_TOLERANCE_SECONDS from now, or whose delivery id was already
handled (a replay; ids are remembered for twice the tolerance, past which its timestamp is stale).

A verified event (`model_version.created`, `model_version_tag.set`,
`model_version_alias.created`) on a model a rule matches is looked up on the tracking server:
the version's tags (the rule's, e.g. `fapm.prune=true`) and where its files are, resolved
through the registry (worker/io/mlflow_rest.py) to an s3:// or local location that is then
checked like any job's. The job is submitted under the Idempotency-Key `mlflow:{name}/{version}`
of the rule's tenant: one job per version, whatever events and retries arrive. Versions fapm
registered itself (tag `fapm.job_id`) start nothing, so an `mlflow://` output of the same model
does not prune its own result.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from app.api.deps import ServicesDep
from app.api.routes.rule_jobs import invalid_job, submit_rule_job
from app.api.services import Services
from app.api.strict_json import StrictJSONRoute
from app.core.problems import ProblemError, field_errors_from_pydantic, problem_responses
from app.jobs.mlflow_rules import EVENTS, MlflowRulesError, MlflowRulesFile
from worker.io.mlflow_rest import MlflowLookupError, MlflowRest, storage_location, tracking_uri
from worker.io.uri import check_mlflow_model_name

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
FAPM_JOB_TAG = "fapm.job_id"  # set by worker/io/mlflow_registry.py on the versions it registers
_DELIVERY_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_VERSION = re.compile(r"[1-9][0-9]{0,18}")


def mlflow_signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The `X-MLflow-Signature` MLflow sends for `body` (its _generate_hmac_signature, over the
    bytes it posts: the UTF-8 encoding of the JSON text it signs)."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def _unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, "unauthorized", detail)


def verify_delivery(
    secret: str | None,
    headers: dict[str, str | None],
    body: bytes,
    tolerance_seconds: int,
    now: float | None = None,
) -> str:
    """The delivery id of a delivery MLflow signed with `secret` within the tolerance; a 401
    problem otherwise. Nothing of the body is interpreted."""
    if not secret:  # an empty secret means "off", never "anything matches the empty string"
        raise _unauthorized("MLflow webhooks are off (FAPM_MLFLOW_WEBHOOK_SECRET is not set).")
    signature = headers.get(SIGNATURE_HEADER.lower())
    stamp = headers.get(TIMESTAMP_HEADER.lower())
    delivery_id = headers.get(DELIVERY_HEADER.lower())
    if not signature or not stamp or not delivery_id:
        raise _unauthorized(
            f"Unsigned delivery: {SIGNATURE_HEADER}, {TIMESTAMP_HEADER} and {DELIVERY_HEADER} "
            "are required (set a secret on the MLflow webhook)."
        )
    if not _DELIVERY_ID.fullmatch(delivery_id) or not stamp.isascii() or not stamp.isdigit():
        raise _unauthorized("Malformed delivery id or timestamp.")
    if abs((time.time() if now is None else now) - int(stamp)) > tolerance_seconds:
        raise _unauthorized(
            f"Stale delivery: {TIMESTAMP_HEADER} is more than {tolerance_seconds}s from now."
        )
    expected = mlflow_signature(secret, delivery_id, stamp, body).encode("ascii")
    # Starlette decodes header bytes as latin-1: encoding back gives the bytes that were sent.
    # Several space-separated signatures are accepted (a secret being rotated).
    given = [part.encode("latin-1") for part in signature.split()]
    if not any(hmac.compare_digest(part, expected) for part in given):
        raise _unauthorized(f"Wrong {SIGNATURE_HEADER} (is the webhook's secret ours?).")
    return delivery_id


def _delivery_key(delivery_id: str) -> str:
    return f"fapm:mlflow:delivery:{delivery_id}"


class MlflowWebhookRoute(StrictJSONRoute):
    """Verifies the signature over the raw body, and refuses a replayed delivery id, before the
    body is decoded; remembers the id once the delivery was handled (a 202)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def verified_handler(request: Request) -> Response:
            services: Services = request.app.state.services
            settings = services.settings
            configured = settings.mlflow_webhook_secret
            body = await request.body()  # at most FAPM_MAX_REQUEST_BYTES (BodyLimitMiddleware)
            delivery_id = verify_delivery(
                configured.get_secret_value() if configured else None,
                dict(request.headers),
                body,
                settings.mlflow_webhook_tolerance_seconds,
            )
            if await services.aredis.exists(_delivery_key(delivery_id)):
                raise _unauthorized(f"Replayed delivery {delivery_id}: it was handled already.")
            sent = False

            async def replay() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await request.receive()

            response = await handler(Request(request.scope, replay))
            if response.status_code == 202:
                await services.aredis.set(
                    _delivery_key(delivery_id),
                    "1",
                    ex=2 * settings.mlflow_webhook_tolerance_seconds,
                )
            return response

        return verified_handler


router = APIRouter(prefix="/v1/hooks", tags=["webhooks in"], route_class=MlflowWebhookRoute)


class _Lenient(BaseModel):
    # MLflow adds fields over time; only what is read here is required.
    model_config = ConfigDict(extra="ignore")


class MlflowVersionRef(_Lenient):
    name: str = Field(description="The registered model.")
    version: str | int = Field(description="The model version.")


class MlflowWebhookPayload(_Lenient):
    """The envelope MLflow posts: `{entity, action, timestamp, data}`."""

    entity: str = Field(description="e.g. model_version, model_version_tag, model_version_alias.")
    action: str = Field(description="e.g. created, set, deleted.")
    timestamp: str | None = None
    data: dict[str, Any] = Field(description="The event's payload (name, version, ...).")


class MlflowWebhookAnswer(BaseModel):
    job_id: str | None = Field(default=None, description="The job this version started.")
    status: str | None = Field(default=None, description="That job's current status.")
    duplicate: bool | None = Field(
        default=None, description="True when an earlier event of this version started the job."
    )
    ignored: str | None = Field(default=None, description="Why no job was started.")


MLFLOW_EXAMPLE = {
    "entity": "model_version",
    "action": "created",
    "timestamp": "2026-01-01T12:00:00.000000+00:00",
    "data": {
        "name": "support-bot",
        "version": "3",
        "source": "s3://acme-mlflow/1/0123456789abcdef/artifacts/model",
        "run_id": "0123456789abcdef",
        "tags": {"fapm.prune": "true"},
        "description": None,
    },
}

_rules_files: dict[Path, MlflowRulesFile] = {}


def _rules(path: Path) -> MlflowRulesFile:
    return _rules_files.setdefault(path, MlflowRulesFile(path))


def _lookup_problem(exc: MlflowLookupError, what: str) -> ProblemError:
    if exc.status == 404:
        return ProblemError(422, "mlflow_not_found", f"{what}: {exc}")
    return ProblemError(503, "mlflow_unavailable", f"{what}: {exc}", headers={"Retry-After": "30"})


@router.post(
    "/mlflow",
    status_code=202,
    response_model=MlflowWebhookAnswer,
    response_model_exclude_none=True,
    summary="MLflow Model Registry webhook: start the job a rule maps a model version to",
    description=(
        "Create an MLflow webhook (MLflow 3.3+) with this URL, the events your rules use and a "
        "secret equal to FAPM_MLFLOW_WEBHOOK_SECRET. A signed event on a version that a rule in "
        "FAPM_MLFLOW_WEBHOOK_RULES_FILE matches (model name, event, version tags) starts one job "
        "for that version, reading the version's files where the registry keeps them. "
        "Everything else that is signed: 202 `{ignored: reason}`."
    ),
    responses={
        202: {
            "content": {
                "application/json": {
                    "examples": {
                        "started": {
                            "value": {
                                "job_id": "0192f1a3c4d5a1b2c3d4e5f6a7b8c9d0",
                                "status": "queued",
                                "duplicate": False,
                            }
                        },
                        "ignored": {"value": {"ignored": "no rule matches other-model"}},
                    }
                }
            }
        },
        **problem_responses(401, 422, 429, 503),
    },
)
def mlflow_webhook(
    services: ServicesDep,
    _signature: Annotated[
        str,
        Header(
            alias=SIGNATURE_HEADER,
            description="v1,<base64 HMAC-SHA256> (checked before the body is parsed).",
        ),
    ],
    _timestamp: Annotated[str, Header(alias=TIMESTAMP_HEADER, description="Unix seconds.")],
    _delivery: Annotated[str, Header(alias=DELIVERY_HEADER, description="Unique per delivery.")],
    payload: Annotated[
        MlflowWebhookPayload, Body(openapi_examples={"version": {"value": MLFLOW_EXAMPLE}})
    ],
) -> MlflowWebhookAnswer:
    settings = services.settings
    event = f"{payload.entity}.{payload.action}"
    if event not in EVENTS:
        return MlflowWebhookAnswer(ignored=f"event {event} starts no job")
    try:
        ref = MlflowVersionRef.model_validate(payload.data)
        name, version = ref.name, str(ref.version)
        check_mlflow_model_name(name)
        if not _VERSION.fullmatch(version):
            raise ValueError(f"version {version!r} is not a version number")
    except ValidationError as exc:
        raise ProblemError(
            422,
            "invalid_mlflow_payload",
            "data: the event names no model version",
            errors=field_errors_from_pydantic(list(exc.errors())),
        ) from None
    except ValueError as exc:
        raise ProblemError(422, "invalid_mlflow_payload", f"data: {exc}") from None
    if settings.mlflow_webhook_rules_file is None:
        return MlflowWebhookAnswer(
            ignored="no rules file configured (FAPM_MLFLOW_WEBHOOK_RULES_FILE)"
        )
    try:
        rule = _rules(settings.mlflow_webhook_rules_file).match(name, event)
    except MlflowRulesError as exc:
        raise ProblemError(503, "mlflow_rules_invalid", str(exc)) from exc
    if rule is None:
        return MlflowWebhookAnswer(ignored=f"no rule matches {event} of {name}")
    server = tracking_uri(settings.mlflow_tracking_uri)
    if server is None:
        raise ProblemError(
            503, "mlflow_unavailable", "no MLflow tracking server configured (MLFLOW_TRACKING_URI)"
        )
    what = f"{name} version {version}"
    try:
        rest = MlflowRest(server)
    except MlflowLookupError as exc:
        raise _lookup_problem(exc, what) from exc
    try:
        found = rest.model_version(name, version)
        if FAPM_JOB_TAG in found.tags:
            return MlflowWebhookAnswer(
                ignored=f"{what} was registered by fapm (job {found.tags[FAPM_JOB_TAG]})"
            )
        missing = rule.missing_tags(found.tags)
        if missing:
            return MlflowWebhookAnswer(ignored=f"{what} lacks the tags {', '.join(missing)}")
        if found.status == "PENDING_REGISTRATION":  # MLflow retries on 503, after Retry-After
            raise ProblemError(
                503,
                "mlflow_version_pending",
                f"{what} is still being registered",
                headers={"Retry-After": "10"},
            )
        if found.status != "READY":
            return MlflowWebhookAnswer(ignored=f"{what} is {found.status}")
        artifact_uri = rest.resolve(rest.download_uri(name, version))
    except MlflowLookupError as exc:
        raise _lookup_problem(exc, what) from exc
    finally:
        rest.close()
    try:
        location = storage_location(artifact_uri, settings.mlflow_artifacts_destination)
        request = rule.job_request(name, version, location)
    except ValidationError as exc:
        raise invalid_job(
            "mlflow_rule_invalid", f"rule {rule.model!r} makes an invalid job for {what}", exc
        ) from exc
    except ValueError as exc:
        raise ProblemError(422, "mlflow_source_unreadable", f"{what}: {exc}") from exc
    return submit_rule_job(
        services, MlflowWebhookAnswer, rule.tenant, request, f"mlflow:{name}/{version}"
    )
