"""Background threads of a worker: the heartbeat (with the sweepers) and a running job's lease.

Heartbeat: one daemon thread in the worker's main process writes `store.heartbeat` every
heartbeat_seconds (the API's /readyz and its GPU routing read it) and, on the same beat, makes
sure that whatever instant a worker died, its job runs again and its webhook goes out, within
about two lease periods instead of the visibility timeout (48 h):

  - a job the API wrote but never enqueued (it died between the two) is enqueued after
    unenqueued_grace_seconds (30 s);
  - a job whose message a worker took but that never reached `note_running` (the worker died
    right after taking it: the job is `queued`, its message is in the broker's `unacked`) has
    that message put back at the head of its queue once it has been taken a lease period ago;
  - a job left `running` without a lease (its worker died after `note_running`: before `start`,
    or mid-job) is re-enqueued at the head of its queue, once: `store.claim_orphans` skips it
    until a worker has taken that message (`note_running`), so it neither waits behind the
    queue nor piles up one duplicate per lease period while it waits;
  - a finished job's webhook whose delivery was never queued (the worker died between
    `store.finish`, which records the webhook as owed in the same script, and the enqueue) or
    was lost (the worker that ran it died mid-POST, or while it held a retry's countdown message,
    which Celery keeps unacknowledged for the visibility timeout) is queued again a lease period
    after its delivery should have shown progress (app/jobs/store.py, "webhooks-owed"); the
    delivery continues the retry schedule from the record and ends at its give-up time.

A duplicate message is harmless: the lease lets one run at a time, a finished job's message is
dropped, and a webhook delivery claims each attempt before POSTing it (a second delivery chain,
queued while the first one's worker was alive but busy, stops at the claim); deliveries share one
webhook-id for the receiver to deduplicate what is left (a POST that outlived its claim).

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
from app.jobs.records import TERMINAL_STATUSES
from app.jobs.store import JobStore, Lease
from worker.broker import Broker

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        hostname: str,
        queues: list[str],
        gpu: bool,
        broker: Broker,
        enqueue: Callable[[str, str], None],
        dispatch_webhook: Callable[[str], None],
    ) -> None:
        super().__init__(name="fapm-heartbeat", daemon=True)
        self.store = store
        self.settings = settings
        self.hostname = hostname
        self.queues = queues
        self.gpu = gpu
        self.broker = broker
        self.enqueue = enqueue
        self.dispatch_webhook = dispatch_webhook
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
        self.broker.close()

    def beat(self) -> None:
        self.store.heartbeat(
            self.hostname, self.queues, self.gpu, ttl=self.settings.heartbeat_fresh_seconds
        )
        self.sweep()

    def sweep(self) -> None:
        now = time.time()
        grace = self.settings.lease_seconds
        cutoff_ms = int((now - self.settings.unenqueued_grace_seconds) * 1000)
        for job_id, queue in self.store.unenqueued_before(cutoff_ms):
            log.warning("job %s was never enqueued (API crashed?); enqueueing it", job_id)
            self.enqueue(job_id, queue)
            self.store.mark_enqueued(job_id)
        # Each step on its own: a broker hiccup in one must not skip the others (the webhooks
        # below included); what a failed step missed comes back on a later beat.
        try:
            self.restore_taken_but_never_started(now - grace)
        except Exception:
            log.exception("could not restore messages taken by dead workers")
        orphans = self.store.claim_orphans(
            now - grace,
            claim_seconds=grace,
            requeue_hold_seconds=self.settings.visibility_timeout_seconds,
        )
        for orphan in orphans:
            log.warning(
                "job %s is running with no lease (its worker died); re-enqueueing it first",
                orphan.job_id,
            )
            try:
                self.broker.enqueue_first(orphan.job_id, orphan.queue)
            except Exception:  # its claim lapses after the grace and it comes back
                log.exception("job %s: could not re-enqueue it", orphan.job_id)
                continue
            self.store.mark_requeued(orphan)
        for job_id in self.store.owed_webhooks_before(int((now - grace) * 1000)):
            log.warning(
                "job %s: its webhook's delivery was never queued or was lost; queueing it", job_id
            )
            try:
                self.dispatch_webhook(job_id)
            except Exception:  # this one comes back after the grace; the others go on
                log.exception("job %s: could not queue its webhook", job_id)

    def restore_taken_but_never_started(self, before: float) -> None:
        """Put back the run_job messages taken before `before` whose job has not been noted
        running since: the worker that took each died first (a live one notes the job within
        moments of taking it). A job noted since, or leased, is the orphan sweep's or is
        running; a finished job's message is left for its holder (or the visibility timeout)
        to drop."""
        taken = self.broker.taken_jobs(before)
        if not taken:
            return
        states = self.store.job_states(sorted({m.job_id for m in taken}))
        for message in taken:
            status, leased, noted_at = states[message.job_id]
            if status is None or status in TERMINAL_STATUSES:
                self.broker.ignore(message.tag)
            elif not leased and (noted_at is None or noted_at < message.taken_at):
                log.warning(
                    "job %s: its worker took it %.0f s ago and died before starting it; "
                    "putting it back first in its queue",
                    message.job_id,
                    time.time() - message.taken_at,
                )
                self.broker.restore(message.tag)

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
