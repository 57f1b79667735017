"""OpenAPI declarations of the webhooks fapm-service sends (OpenAPI 3.1 `webhooks`).

Nothing here runs: the worker delivers them. These stubs give receivers a typed contract: the
body (`WebhookEvent`) and the Standard Webhooks headers to verify.
"""

from typing import Annotated

from fastapi import Body, FastAPI, Header

from app.api import examples
from app.jobs.records import WebhookEvent

SIGNATURE_DOC = (
    "Signed per Standard Webhooks 1.0 when the job's webhook has a secret: "
    "`webhook-signature: v1,<base64(HMAC-SHA256(key, webhook-id + '.' + webhook-timestamp + "
    "'.' + raw body))>`, where `key` is the base64-decoded part after `whsec_` for secrets of "
    "that form, else the secret's UTF-8 bytes. Verify against the raw body, compare in "
    "constant time, and reject timestamps more than 5 minutes old. `webhook-id` stays the same "
    "across retries: use it to drop duplicates. Answer 2xx to acknowledge; anything else (or "
    "no answer within the timeout) is retried with exponential backoff and jitter, and each "
    "attempt is listed in the job record's `webhook.deliveries`."
)

EVENTS = {
    "job.succeeded": ("A job succeeded", examples.SUCCEEDED_RECORD),
    "job.failed": ("A job failed", examples.FAILED_RECORD),
    "job.cancelled": ("A job was cancelled", examples.CANCELLED_RECORD),
}


def _declare(app: FastAPI, event_type: str, summary: str, record: dict) -> None:
    example = {"type": event_type, "timestamp": "2026-10-01T12:01:50Z", "data": record}

    def receiver(
        body: Annotated[WebhookEvent, Body(openapi_examples={event_type: {"value": example}})],
        webhook_id: Annotated[
            str,
            Header(
                alias="webhook-id",
                description="Unique per event; the same on every retry.",
                examples=["msg_0192f1a3c4d5a1b2c3d4e5f6a7b8c9d0"],
            ),
        ],
        webhook_timestamp: Annotated[
            int,
            Header(alias="webhook-timestamp", description="Unix seconds of this attempt."),
        ],
        webhook_signature: Annotated[
            str | None,
            Header(
                alias="webhook-signature",
                description="Space-separated `v1,<base64>` signatures; absent when unsigned.",
                examples=["v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4="],
            ),
        ] = None,
    ) -> None:
        """Declared only (see the module docstring)."""

    receiver.__name__ = event_type.replace(".", "_")
    app.webhooks.post(
        event_type,
        summary=summary,
        description=f"POSTed to the job's `webhook.url` when it ends. {SIGNATURE_DOC}",
        responses={200: {"description": "Any 2xx acknowledges the delivery."}},
    )(receiver)


def declare_outbound_webhooks(app: FastAPI) -> None:
    for event_type, (summary, record) in EVENTS.items():
        _declare(app, event_type, summary, record)
