"""Outbound webhooks: Standard Webhooks signing and one delivery attempt with its retry plan.

A job's end (succeeded, failed, cancelled) is POSTed to its webhook as a WebhookEvent, signed per
Standard Webhooks 1.0 (https://www.standardwebhooks.com):

  webhook-id         msg_<job id>: the same on every retry, so receivers can deduplicate
  webhook-timestamp  unix seconds of this attempt
  webhook-signature  v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>

The key: for a secret `whsec_<base64>` (the spec's format) the base64-decoded bytes after the
prefix; any other secret (or one whose tail is not valid base64) is used as its UTF-8 bytes.
Without a secret, deliveries go out unsigned (no webhook-signature header).

Before each attempt the URL is checked again (check_webhook_url): DNS may have changed since the
job was submitted. The connection then goes to exactly the addresses that were checked, so a
second lookup cannot be steered to a private address (DNS rebinding). No redirects are followed,
and no proxy settings from the environment are used.

The secret is never logged and never written to the job record; the URL's query (often a
token) is shown as REDACTED in the record, the delivered body and the logs. With FAPM_SECRETS_KEYS
both are stored sealed (app/core/sealing.py); a URL or secret this worker cannot unseal (its keys
lack the one that sealed it) is a failed attempt with the error `unseal_failed: ...`: nothing is
POSTed, and it is retried on the usual schedule, because during a key rollout another worker (or
this one, restarted with the new keys) may hold the key; a key no worker has gives up at the end
of the retry window as any failing receiver does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpcore
import httpx

from app.core.config import Settings
from app.core.netguard import check_webhook_url
from app.core.sealing import UnsealError
from app.jobs.records import REDACTED, JobRecord, WebhookEvent, redacted_url
from app.jobs.store import JobStore
from worker.io import strict_json

log = logging.getLogger(__name__)


class _RedactedRequestURLs(logging.Filter):
    """httpx logs every request's URL at INFO ("HTTP Request: POST https://..."): a webhook
    URL's query (often a token) must not reach the worker log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redacted_url(str(arg)) if isinstance(arg, httpx.URL) else arg for arg in record.args
            )
        return True


logging.getLogger("httpx").addFilter(_RedactedRequestURLs())

SECRET_PREFIX = "whsec_"
USER_AGENT = "fapm-service-webhooks/1"
# Longest Retry-After (seconds) a receiver can ask for; beyond it our own backoff applies.
MAX_RETRY_AFTER = 3600.0
# The recorded error's code when the stored URL or secret cannot be unsealed.
UNSEAL_FAILED = "unseal_failed"


def webhook_id_for(job_id: str) -> str:
    """The delivery id of a job's end-of-job event (one event per job, so one id)."""
    return f"msg_{job_id}"


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: base64-decoded after `whsec_`, else the secret's UTF-8 bytes."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode()


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one message."""
    content = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, webhook_id: str, timestamp: str, body: bytes, signatures: str) -> bool:
    """A receiver's check (used by the tests; documents the scheme): any v1 signature matches."""
    expected = sign(secret, webhook_id, int(timestamp), body).encode()
    return any(
        hmac.compare_digest(expected, candidate.encode())
        for candidate in signatures.split()
        if candidate.startswith("v1,")
    )


def signed_headers(secret: str | None, webhook_id: str, body: bytes) -> dict[str, str]:
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
    }
    if secret:
        headers["webhook-signature"] = sign(secret, webhook_id, timestamp, body)
    return headers


class _PinnedBackend(httpcore.SyncBackend):
    """Connects to the addresses the URL check approved instead of resolving the host again.
    TLS still verifies the certificate against the host name (httpcore passes it as SNI)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        error: Exception | None = None
        for address in self.addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error or httpcore.ConnectError("no address to connect to")


def _client(addresses: list[str], timeout: float) -> httpx.Client:
    transport = httpx.HTTPTransport(trust_env=False)
    if addresses:
        # httpx has no public hook for the network backend; replace the pool it built with the
        # same one on a pinned backend (the settings are httpx's defaults for this transport).
        transport._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            network_backend=_PinnedBackend(addresses),
        )
    return httpx.Client(
        transport=transport, timeout=timeout, follow_redirects=False, trust_env=False
    )


@dataclass(frozen=True)
class AttemptOutcome:
    status_code: int | None
    error: str | None
    delivered: bool
    retry: bool  # False once delivered, on 410 Gone, or when the retry window is over
    retry_after: float | None = None


def post_event(
    url: str, body: bytes, headers: dict[str, str], settings: Settings
) -> AttemptOutcome:
    """One POST: 2xx delivered; 410 stop (the receiver says the endpoint is gone); else retry."""
    try:
        addresses = check_webhook_url(url, settings.webhook_allow)
    except ValueError as exc:
        # The host may resolve differently later (or be fixed); keep to the retry plan.
        return AttemptOutcome(None, f"refused: {exc}", delivered=False, retry=True)
    try:
        with _client(addresses, settings.webhook_timeout_seconds) as client:
            response = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return AttemptOutcome(None, f"{type(exc).__name__}: {exc}", delivered=False, retry=True)
    code = response.status_code
    if 200 <= code < 300:
        return AttemptOutcome(code, None, delivered=True, retry=False)
    if code == 410:
        return AttemptOutcome(code, "410 Gone: not retried", delivered=False, retry=False)
    return AttemptOutcome(
        code,
        f"HTTP {code}",
        delivered=False,
        retry=True,
        retry_after=_retry_after(response.headers.get("retry-after")),
    )


def _without_url(error: str | None, url: str) -> str | None:
    """An attempt's error as it is recorded and logged: an HTTP library may quote the URL, whose
    query (often a token) is never shown."""
    if error is None:
        return None
    error = error.replace(url, redacted_url(url))
    query = urlsplit(url).query
    return error.replace(query, REDACTED) if query else error


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        return None  # an HTTP date: rare for webhooks, our backoff applies


def next_delay(attempt: int, settings: Settings, retry_after: float | None = None) -> float:
    """Backoff before attempt `attempt + 1`: first_retry * 2**(attempt-1), +-25% jitter so
    many failed deliveries do not come back in lockstep; a receiver's Retry-After wins if
    longer."""
    base = settings.webhook_first_retry_seconds * 2 ** (attempt - 1)
    delay = base * random.uniform(0.75, 1.25)
    return max(delay, retry_after or 0.0)


def attempt_claim_seconds(settings: Settings) -> float:
    """How long a delivery holds the claim on the attempt it makes: the POST's timeout plus
    half a lease of slack. The sweeper re-queues a delivery a webhook timeout and a whole lease
    after its claim (the claim moves the owed stamp), so a dead holder's claim has lapsed by
    then."""
    return settings.webhook_timeout_seconds + settings.lease_seconds / 2


def delivery_ended(record: JobRecord) -> bool:
    """Whether a job's webhook delivery has ended: its last recorded attempt delivered it, or
    scheduled no other (410 Gone, or out of retry time)."""
    attempts = record.webhook.deliveries if record.webhook else []
    return bool(attempts) and (attempts[-1].delivered or attempts[-1].next_attempt_at is None)


def deliver(
    store: JobStore, settings: Settings, job_id: str, event_type: str, webhook_id: str
) -> float | None:
    """Make the next delivery attempt of a job's event and record it in the job record.
    Returns the delay before the attempt after it, or None when this delivery chain ends:
    the delivery has ended (delivered, gone, out of retry time, or nothing to deliver), or
    another chain is making this attempt (see claim_webhook_attempt) and carries it on.

    The schedule lives in the record, not in the Celery message: the attempt number, the first
    attempt's time (which the retry window counts from) and when the next attempt is due come
    from the attempts recorded so far. So a delivery queued again by the sweeper (its worker died
    mid-POST or holding the retry's countdown) continues where the lost one stopped, and a
    duplicate message for a webhook already delivered or given up is dropped. The job's entry
    in the store's owed webhooks is moved forward at each step and cleared at the end."""
    record = store.get(job_id)
    if record is None or record.webhook is None:
        log.info("job %s has no webhook (or no record): nothing to deliver", job_id)
        store.webhook_settled(job_id)
        return None
    done = record.webhook.deliveries
    if delivery_ended(record):
        log.info("webhook %s of job %s has ended already: duplicate dropped", webhook_id, job_id)
        store.webhook_settled(job_id)
        return None
    now = time.time()
    if done and done[-1].next_attempt_at.timestamp() > now:
        # A re-queued delivery, early: wait for the attempt the lost one had scheduled.
        wait = done[-1].next_attempt_at.timestamp() - now
        store.webhook_expected_by(job_id, now + wait + settings.webhook_timeout_seconds)
        return wait
    attempt = len(done) + 1
    first_attempt_at = done[0].at.timestamp() if done else now
    # One POST per attempt however many delivery chains run (the sweeper re-queues a delivery
    # whose worker is alive but busy, e.g. holding a retry's countdown behind a long job): the
    # attempt is claimed first, and a chain that cannot claim it stops here. Nothing is lost: the
    # holder records the attempt and carries the schedule on, and if it dies the webhook stays
    # owed and the sweeper re-queues it a lease after the stamp, by when the claim has lapsed.
    if not store.claim_webhook_attempt(
        job_id,
        attempt,
        claim_seconds=attempt_claim_seconds(settings),
        expected_by=now + settings.webhook_timeout_seconds,
    ):
        log.info(
            "webhook %s of job %s: attempt %d is made or was made by another delivery; "
            "this one stops",
            webhook_id,
            job_id,
            attempt,
        )
        return None

    event = WebhookEvent(
        type=event_type, timestamp=record.finished_at or datetime.now(UTC), data=record
    )
    # The body as strict JSON, through the one helper that writes JSON (non-finite -> null).
    body = strict_json.dumps(
        event.model_dump(mode="json"), separators=(",", ":"), ensure_ascii=False
    ).encode()
    try:
        url = record.webhook.delivery_url  # the full URL; the record (and body) show it redacted
        secret = store.webhook_secret(job_id)
    except UnsealError as exc:
        outcome = AttemptOutcome(None, f"{UNSEAL_FAILED}: {exc}", delivered=False, retry=True)
        error = outcome.error
    else:
        outcome = post_event(url, body, signed_headers(secret, webhook_id, body), settings)
        error = _without_url(outcome.error, url)

    delay = None
    if outcome.retry:
        delay = next_delay(attempt, settings, outcome.retry_after)
        if time.time() + delay - first_attempt_at > settings.webhook_retry_seconds:
            delay = None
    now_dt = datetime.now(UTC)
    if delay is not None:  # before the attempt is recorded, so the stamp is never stale
        store.webhook_expected_by(job_id, time.time() + delay + settings.webhook_timeout_seconds)
    store.record_webhook_delivery(
        job_id,
        {
            "attempt": attempt,
            "at": now_dt.isoformat(),
            "status_code": outcome.status_code,
            "error": error,
            "delivered": outcome.delivered,
            "next_attempt_at": (now_dt + timedelta(seconds=delay)).isoformat() if delay else None,
        },
    )
    if delay is None:
        store.webhook_settled(job_id)
    if outcome.delivered:
        log.info("webhook %s of job %s delivered (attempt %d)", webhook_id, job_id, attempt)
    elif delay is None:
        log.warning(
            "webhook %s of job %s given up after attempt %d: %s",
            webhook_id,
            job_id,
            attempt,
            error,
        )
    else:
        log.info(
            "webhook %s of job %s attempt %d failed (%s); retry in %.1f s",
            webhook_id,
            job_id,
            attempt,
            error,
            delay,
        )
    return delay
