"""Background threads of a worker: the heartbeat (with the sweepers) and a running job's lease.

Heartbeat: one daemon thread in the worker's main process writes `store.heartbeat` every
heartbeat_seconds (the API's /readyz and its GPU routing read it) and, on the same beat, hands
two kinds of stranded jobs back to Celery:
  - jobs the API wrote but never enqueued (it died between the two), after
    unenqueued_grace_seconds (30 s);
  - jobs left `running` without a lease: their worker died. Celery would re-deliver the message
    only after the visibility timeout (hours); this gets the job going again within about a
    lease period. A duplicate message is harmless: the lease lets one run at a time, and a
    finished job's message is dropped.

Lease: while a job runs, a thread renews its lease every lease_seconds/3. If a renewal finds the
lease gone (this worker stalled for a whole lease period and another one may have taken over),
`lost` is set and the job stops at the next tensor without touching the record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from app.core.config import Settings
from app.jobs.store import JobStore, Lease

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        hostname: str,
        queues: list[str],
        gpu: bool,
        enqueue: Callable[[str, str], None],
    ) -> None:
        super().__init__(name="fapm-heartbeat", daemon=True)
        self.store = store
        self.settings = settings
        self.hostname = hostname
        self.queues = queues
        self.gpu = gpu
        self.enqueue = enqueue
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:  # Redis away for a moment: the next beat tries again
                log.exception("heartbeat failed")
            if self._halt.wait(self.settings.heartbeat_seconds):
                break
        try:
            self.store.forget_worker(self.hostname)
        except Exception:  # the entry goes stale on its own
            log.exception("could not remove the heartbeat of %s", self.hostname)

    def beat(self) -> None:
        self.store.heartbeat(
            self.hostname, self.queues, self.gpu, ttl=self.settings.heartbeat_fresh_seconds
        )
        self.sweep()

    def sweep(self) -> None:
        cutoff_ms = int((time.time() - self.settings.unenqueued_grace_seconds) * 1000)
        for job_id, queue in self.store.unenqueued_before(cutoff_ms):
            log.warning("job %s was never enqueued (API crashed?); enqueueing it", job_id)
            self.enqueue(job_id, queue)
            self.store.mark_enqueued(job_id)
        for job_id, queue in self.store.orphaned_before(time.time() - self.settings.lease_seconds):
            log.warning("job %s is running with no lease (its worker died); re-enqueueing", job_id)
            self.enqueue(job_id, queue)

    def stop(self) -> None:
        """Stop beating and remove this worker's heartbeat (from the thread, so a signal
        handler that calls this never waits on Redis)."""
        self._halt.set()


class LeaseKeeper:
    """Renews a job's lease from a thread while the job runs: `with LeaseKeeper(...) as keeper`."""

    def __init__(self, store: JobStore, lease: Lease, lease_seconds: float) -> None:
        self.store = store
        self.lease = lease
        self.lease_seconds = lease_seconds
        self.lost = False
        self._halt = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"fapm-lease-{lease.job_id}", daemon=True
        )

    def _run(self) -> None:
        while not self._halt.wait(self.lease_seconds / 3):
            try:
                if not self.store.renew(self.lease, self.lease_seconds):
                    log.error("job %s: lease lost; stopping this attempt", self.lease.job_id)
                    self.lost = True
                    return
            except Exception:  # a Redis hiccup: the lease still has two thirds to go
                log.exception("job %s: lease renewal failed", self.lease.job_id)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join()
