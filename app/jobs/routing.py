"""Which Celery queue a job goes to.

`device: cuda` needs a GPU worker, so `gpu`; `device: cpu` goes to `cpu`. `auto` goes to `gpu`
only while some worker that consumes `gpu` has a fresh heartbeat, so a CPU-only deployment never
parks jobs on a queue nobody reads. (A CPU worker runs an `auto` job on the CPU; a GPU worker on
the GPU.)

The answer to "is a GPU worker alive?" costs two Redis calls, so it is cached for a second: a
submission burst pays it once, and a GPU worker that dies is noticed within
`heartbeat_fresh_seconds` plus that second.
"""

from __future__ import annotations

import threading
import time

from app.jobs.records import QueueName
from app.jobs.store import JobStore
from worker.spec import EvaluationJobSpec, JobSpec


def gpu_worker_alive(workers: dict[str, dict]) -> bool:
    """True if one of these heartbeats (hostname -> {queues, gpu, at}) consumes `gpu`."""
    return any(info.get("gpu") and "gpu" in info.get("queues", ()) for info in workers.values())


class QueueRouter:
    def __init__(self, store: JobStore, fresh_seconds: float, cache_seconds: float = 1.0) -> None:
        self._store = store
        self._fresh = fresh_seconds
        self._cache = cache_seconds
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._gpu = False

    def gpu_available(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at >= self._cache:
            with self._lock:
                if now - self._checked_at >= self._cache:
                    self._gpu = gpu_worker_alive(self._store.fresh_workers(self._fresh))
                    self._checked_at = time.monotonic()
        return self._gpu

    def queue_for(self, spec: JobSpec | EvaluationJobSpec) -> QueueName:
        if spec.device == "cuda":
            return "gpu"
        if spec.device == "cpu":
            return "cpu"
        return "gpu" if self.gpu_available() else "cpu"
