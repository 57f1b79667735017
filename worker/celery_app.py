"""The Celery application: Redis broker, long-job settings and queue names.

Imported by the API too (to enqueue with `send_task`), so it must not import torch; the tasks
module is loaded only by worker processes (`include`).
"""

from __future__ import annotations

from celery import Celery

from app.core.config import get_settings

RUN_JOB_TASK = "fapm.run_job"
QUEUES = ("cpu", "gpu")

_settings = get_settings()
celery_app = Celery("fapm", broker=_settings.redis_url, include=["worker.tasks"])
celery_app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    result_backend=None,
    task_serializer="json",
    accept_content=["json"],
    task_default_queue="cpu",
    broker_connection_retry_on_startup=True,
    # A job re-delivered after this long without an ack: must exceed the longest job.
    broker_transport_options={"visibility_timeout": _settings.visibility_timeout_seconds},
    visibility_timeout=_settings.visibility_timeout_seconds,
    worker_cancel_long_running_tasks_on_connection_loss=True,
)


def enqueue_job(job_id: str, queue: str) -> None:
    """Hand a job (already written to Redis) to the workers of `queue`."""
    celery_app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)
