"""Celery tasks and worker start-up hooks, loaded only by worker processes (celery_app `include`).

Process tuning comes first: tune_runtime() sets allocator and OpenMP variables that torch reads
when it is imported, and the task modules below import the engine (and so torch).
"""

from worker.cli import tune_runtime

tune_runtime()

from worker.tasks import deliver_webhook, run_job, startup  # noqa: E402

__all__ = ["deliver_webhook", "run_job", "startup"]
