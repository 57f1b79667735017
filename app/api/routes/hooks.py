"""POST /v1/hooks/huggingface: a push to a Hub model repo starts the job a rule maps it to.

The Hub authenticates its webhooks with a shared secret in `X-Webhook-Secret` (no signature),
compared here in constant time. A matched push becomes a job with `finetuned:
hf://{repo}@{sha}` under the Idempotency-Key `hf:{repo}@{sha}` of the rule's tenant, so a
re-delivered (or re-sent) webhook finds the first job instead of starting a second one. Every
delivery that passes the secret check is answered 202: with the job id, or with why it was
ignored (another event, another repo type, no rule, another branch).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Body, Header, Request
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from app.api.deps import ServicesDep
from app.api.routes.rule_jobs import invalid_job, submit_rule_job
from app.api.services import Services
from app.api.strict_json import StrictJSONRoute
from app.core.problems import ProblemError, problem_responses
from app.jobs.hub_rules import HubRulesError
from worker.io.location_names import COMMIT_SHA, check_hub_repo_id

# Only pushes of content start jobs (the Hub's scope for commits is `repo.content`).
TRIGGER_SCOPE = "repo.content"
TRIGGER_ACTIONS = ("create", "update")


class _Lenient(BaseModel):
    # The Hub adds fields over time; only what is read here is required.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class HubEvent(_Lenient):
    action: str = Field(description="create, update, delete or move.")
    scope: str = Field(description="e.g. repo, repo.content, repo.config, discussion.")


class HubRepo(_Lenient):
    name: str = Field(description="Repo id, org/name.")
    type: str = Field(description="model, dataset or space.")
    head_sha: str | None = Field(default=None, validation_alias=AliasChoices("headSha", "head_sha"))


class HubUpdatedRef(_Lenient):
    ref: str
    oldSha: str | None = None
    newSha: str | None = None


class HubWebhookPayload(_Lenient):
    """The parts of huggingface_hub's `WebhookPayload` (version 3) this endpoint reads."""

    event: HubEvent
    repo: HubRepo
    updatedRefs: list[HubUpdatedRef] | None = None


class HubWebhookAnswer(BaseModel):
    job_id: str | None = Field(default=None, description="The job this push started.")
    status: str | None = Field(default=None, description="That job's current status.")
    duplicate: bool | None = Field(
        default=None, description="True when an earlier delivery of this push started the job."
    )
    ignored: str | None = Field(default=None, description="Why no job was started.")


HUB_EXAMPLE = {
    "event": {"action": "update", "scope": "repo.content"},
    "repo": {
        "type": "model",
        "name": "acme/llama-3.1-8b-sft",
        "id": "6560c33a5c7b1a9ce1bfa0d9",
        "private": True,
        "headSha": "3f2a9c1d0b7e4f6a8c5d2e1f0a9b8c7d6e5f4a3b",
    },
    "updatedRefs": [
        {
            "ref": "refs/heads/main",
            "oldSha": "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d",
            "newSha": "3f2a9c1d0b7e4f6a8c5d2e1f0a9b8c7d6e5f4a3b",
        }
    ],
    "webhook": {"id": "6560c3f3a1b2c3d4e5f60718", "version": 3},
}


def check_hub_secret(services: Services, given: str | None) -> None:
    """401 unless `given` equals FAPM_HF_WEBHOOK_SECRET (compared in constant time)."""
    configured = services.settings.hf_webhook_secret
    expected = configured.get_secret_value().encode("utf-8") if configured else b""
    # An empty secret means "off", never "anything matches the empty string".
    # Starlette decodes header bytes as latin-1: encoding back gives the bytes that were sent.
    given_bytes = (given or "").encode("latin-1")
    if not (expected and hmac.compare_digest(given_bytes, expected)):
        raise ProblemError(
            401, "unauthorized", "Missing or wrong X-Webhook-Secret (or Hub webhooks are off)."
        )


class HubWebhookRoute(StrictJSONRoute):
    """Checks X-Webhook-Secret before the body is read: an unauthenticated sender gets its 401
    without the API reading, decoding or validating anything it sent."""

    async def before_body(self, request: Request) -> None:
        check_hub_secret(request.app.state.services, request.headers.get("x-webhook-secret"))


router = APIRouter(prefix="/v1/hooks", tags=["webhooks in"], route_class=HubWebhookRoute)


def _pushed_sha(payload: HubWebhookPayload, revision: str) -> str | HubWebhookAnswer | None:
    """The new commit of `revision`, or an `ignored` answer."""
    if payload.updatedRefs is not None:
        wanted = f"refs/heads/{revision}"
        for ref in payload.updatedRefs:
            if ref.ref == wanted:
                if not ref.newSha:
                    return HubWebhookAnswer(ignored=f"{wanted} was deleted")
                return ref.newSha
        return HubWebhookAnswer(ignored=f"{wanted} was not updated")
    return payload.repo.head_sha


@router.post(
    "/huggingface",
    status_code=202,
    response_model=HubWebhookAnswer,
    response_model_exclude_none=True,
    summary="Hugging Face Hub webhook: start the job a rule maps a pushed repo to",
    description=(
        "Configure a Hub webhook on your model repos (or your org) with this URL and a secret "
        "equal to FAPM_HF_WEBHOOK_SECRET. A push (`event.scope` `repo.content`) to a repo "
        "matched by a rule in FAPM_HF_WEBHOOK_RULES_FILE starts a job for the new commit; "
        "repeated deliveries of the same push return the same job. Everything else: 202 "
        "`{ignored: reason}`."
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
                        "ignored": {"value": {"ignored": "no rule matches acme/other-model"}},
                    }
                }
            }
        },
        **problem_responses(401, 422, 429, 503),
    },
)
def huggingface_webhook(
    services: ServicesDep,
    _secret: Annotated[
        str,
        Header(
            alias="X-Webhook-Secret",
            description="The secret set on the Hub webhook (checked before the body is read).",
        ),
    ],
    payload: Annotated[HubWebhookPayload, Body(openapi_examples={"push": {"value": HUB_EXAMPLE}})],
) -> HubWebhookAnswer:
    repo = payload.repo.name
    if payload.repo.type != "model":
        return HubWebhookAnswer(ignored=f"{payload.repo.type} repos start no jobs")
    if payload.event.scope != TRIGGER_SCOPE or payload.event.action not in TRIGGER_ACTIONS:
        return HubWebhookAnswer(
            ignored=f"event {payload.event.scope}/{payload.event.action} starts no job"
        )
    try:
        check_hub_repo_id(repo)  # the Hub's own rules, as every hf:// location is checked
    except ValueError as exc:
        raise ProblemError(422, "invalid_hub_payload", f"repo.name: {exc}") from None
    if services.hub_rules is None:
        return HubWebhookAnswer(ignored="no rules file configured (FAPM_HF_WEBHOOK_RULES_FILE)")
    try:
        rule = services.hub_rules.match(repo)
    except HubRulesError as exc:
        raise ProblemError(503, "hub_rules_invalid", str(exc)) from exc
    if rule is None:
        return HubWebhookAnswer(ignored=f"no rule matches {repo}")
    sha = _pushed_sha(payload, rule.revision)
    if isinstance(sha, HubWebhookAnswer):
        return sha
    if sha is None or not COMMIT_SHA.fullmatch(sha):
        raise ProblemError(
            422, "invalid_hub_payload", f"no commit sha (40 hex digits) for {repo}: {sha!r}"
        )
    try:
        request = rule.job_request(repo, sha)
    except ValidationError as exc:
        raise invalid_job(
            "hub_rule_invalid", f"rule {rule.repo!r} makes an invalid job for {repo}", exc
        ) from exc
    except ValueError as exc:
        raise ProblemError(422, "hub_rule_invalid", f"rule {rule.repo!r}: {exc}") from exc
    return submit_rule_job(services, HubWebhookAnswer, rule.tenant, request, f"hf:{repo}@{sha}")
