"""A stand-in Celery app with the service's long-job settings, for the worker entrypoint's test.

Not the service's app: that one imports the job engine; this one only sleeps, so the test shows
what the entrypoint and Celery do with a running job on SIGTERM, without a model.
"""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery("probe", broker=os.environ["PROBE_BROKER_URL"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_transport_options={"visibility_timeout": 48 * 3600},
    worker_hijack_root_logger=False,
)


@app.task(name="probe.sleep")
def sleep(seconds: float, marker: str) -> None:
    """Sleep, then leave `marker` behind as the proof that the job ran to its end."""
    time.sleep(seconds)
    with open(marker, "w") as handle:
        handle.write("done")


@app.task(name="probe.stubborn")
def stubborn(seconds: float, marker: str) -> None:
    """Like `sleep`, in a process that ignores SIGTERM: a cold shutdown cannot stop it."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sleep(seconds, marker)
