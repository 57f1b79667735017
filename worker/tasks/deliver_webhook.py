"""`fapm.deliver_webhook(job_id, event_type, webhook_id)`: one delivery attempt per run, retried
with Celery countdowns (exponential backoff with jitter) until delivered, refused with 410, or
webhook_retry_seconds after the first attempt. The logic, and the schedule (kept in the job
record, so a delivery the sweeper queues again after its worker died continues it), live in
worker/webhooks.py."""

from __future__ import annotations

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
    first_attempt_at: float | None = None,  # sent by earlier versions; the record has it
) -> None:
    delay = deliver(job_store(), get_settings(), job_id, event_type, webhook_id)
    if delay is not None:
        raise self.retry(args=[job_id, event_type, webhook_id], kwargs={}, countdown=delay)
