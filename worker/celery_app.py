"""The Celery application: Redis broker, long-job settings and queue names.

Imported by the API too (to enqueue with `send_task`), so it must not import torch; the tasks
and the worker start-up hooks (`worker.tasks`) are loaded only by worker processes (`include`).

Queues:
  cpu       prune jobs for any machine
  gpu       prune jobs that want CUDA (the API routes them; see app/jobs/routing.py)
  webhooks  end-of-job webhook deliveries and their retries

Webhooks have their own queue so that a delivery never waits in line behind hours of prune jobs
in `cpu`/`gpu`. A worker started with no `-Q` consumes all three (so a one-worker install
delivers webhooks too); with long jobs, run one more small worker for the webhooks alone, e.g.
`celery -A worker.celery_app worker -Q webhooks --pool threads -c 8` (deliveries wait on the
network, not the CPU).
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from app.core.config import get_settings

RUN_JOB_TASK = "fapm.run_job"
DELIVER_WEBHOOK_TASK = "fapm.deliver_webhook"
QUEUES = ("cpu", "gpu")
WEBHOOK_QUEUE = "webhooks"

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
    # Each queue on its own direct exchange, as Celery would create it on demand (a Queue without
    # one would share the default exchange and routing key, and receive cpu's messages too).
    task_queues=[
        Queue(name, Exchange(name, type="direct"), routing_key=name)
        for name in (*QUEUES, WEBHOOK_QUEUE)
    ],
    task_default_queue="cpu",
    task_routes={DELIVER_WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE}},
    broker_connection_retry_on_startup=True,
    # A job re-delivered after this long without an ack: must exceed the longest job (and the
    # longest webhook retry countdown, since a waiting retry is an unacknowledged message too).
    # Set for the broker and at the top level, as Celery reads both.
    broker_transport_options={"visibility_timeout": _settings.visibility_timeout_seconds},
    visibility_timeout=_settings.visibility_timeout_seconds,
    worker_cancel_long_running_tasks_on_connection_loss=True,
)


def enqueue_job(job_id: str, queue: str) -> None:
    """Hand a job (already written to Redis) to the workers of `queue`."""
    celery_app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)


def enqueue_webhook(job_id: str, event_type: str, webhook_id: str) -> None:
    """Queue the first delivery of a job's end-of-job webhook."""
    celery_app.send_task(
        DELIVER_WEBHOOK_TASK, args=[job_id, event_type, webhook_id], queue=WEBHOOK_QUEUE
    )
