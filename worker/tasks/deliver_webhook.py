"""`fapm.deliver_webhook(job_id, event_type, webhook_id)`: one delivery attempt per run, retried
with Celery countdowns (exponential backoff with jitter) until delivered, refused with 410, or
webhook_retry_seconds after the first attempt. The logic lives in worker/webhooks.py."""

from __future__ import annotations

import time

from celery import Task

from app.core.config import get_settings
from worker.celery_app import DELIVER_WEBHOOK_TASK, celery_app
from worker.tasks.store import job_store
from worker.webhooks import deliver


@celery_app.task(name=DELIVER_WEBHOOK_TASK, bind=True, max_retries=None)
def deliver_webhook(
    self: Task,
    job_id: str,
    event_type: str,
    webhook_id: str,
    first_attempt_at: float | None = None,
) -> None:
    first_attempt_at = first_attempt_at or time.time()
    delay = deliver(
        job_store(),
        get_settings(),
        job_id,
        event_type,
        webhook_id,
        attempt=self.request.retries + 1,
        first_attempt_at=first_attempt_at,
    )
    if delay is not None:
        raise self.retry(
            args=[job_id, event_type, webhook_id],
            kwargs={"first_attempt_at": first_attempt_at},
            countdown=delay,
        )
