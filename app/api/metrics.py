"""Prometheus metrics computed from Redis at scrape time.

The counters live in the store's `fapm:stats` hash, which the workers' Lua scripts update, so
every API replica reports the same, cluster-wide numbers and nothing is lost when a process
restarts. A custom collector turns that hash (and the Celery queue lengths) into metric families
on each scrape; the API process keeps no metric state of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from app.jobs.records import ACTIVE_STATUSES, TERMINAL_STATUSES
from app.jobs.store import DURATION_BUCKETS, JobStore

# Celery's Redis transport keeps each queue as a list named after it.
DEPTH_QUEUES = ("cpu", "gpu", "webhooks")


class StoreCollector:
    def __init__(self, store: JobStore, heartbeat_fresh_seconds: float) -> None:
        self.store = store
        self.fresh = heartbeat_fresh_seconds

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        with self.store.redis.pipeline(transaction=False) as pipe:
            for queue in DEPTH_QUEUES:
                pipe.llen(queue)
            depths = pipe.execute()
        workers = self.store.fresh_workers(self.fresh)

        # Active states only: finished jobs expire from the store after FAPM_JOB_TTL_SECONDS
        # without touching the counts, so a gauge of them would only ever grow.
        # fapm_jobs_finished counts them instead.
        jobs = GaugeMetricFamily("fapm_jobs", "Jobs queued or running, by state.", labels=["state"])
        for state in ACTIVE_STATUSES:
            jobs.add_metric([state], max(0.0, stats.get(f"state:{state}", 0.0)))
        yield jobs

        finished = CounterMetricFamily(
            "fapm_jobs_finished", "Jobs that ended, by final status.", labels=["status"]
        )
        for status in TERMINAL_STATUSES:
            finished.add_metric([status], stats.get(f"finished:{status}", 0.0))
        yield finished

        # observe_duration increments every bucket whose bound is >= the duration, so the
        # stored counts are already cumulative, as Prometheus wants them.
        buckets = [
            (str(float(bound)), stats.get(f"duration_le:{bound}", 0.0))
            for bound in DURATION_BUCKETS
        ]
        buckets.append(("+Inf", stats.get("duration_count", 0.0)))
        yield HistogramMetricFamily(
            "fapm_job_duration_seconds",
            "Run time of finished jobs (start to end), seconds.",
            buckets=buckets,
            sum_value=stats.get("duration_sum", 0.0),
        )

        processed = CounterMetricFamily(
            "fapm_bytes_processed", "Checkpoint bytes read by finished jobs."
        )
        processed.add_metric([], stats.get("bytes_processed", 0.0))
        yield processed

        depth = GaugeMetricFamily(
            "fapm_queue_depth", "Tasks waiting in each Celery queue.", labels=["queue"]
        )
        for queue, length in zip(DEPTH_QUEUES, depths, strict=True):
            depth.add_metric([queue], float(length))
        yield depth

        alive = GaugeMetricFamily(
            "fapm_workers", "Workers with a fresh heartbeat, by queue.", labels=["queue"]
        )
        for queue in DEPTH_QUEUES:
            count = sum(1 for info in workers.values() if queue in info.get("queues", ()))
            alive.add_metric([queue], float(count))
        yield alive


def metrics_registry(store: JobStore, heartbeat_fresh_seconds: float) -> CollectorRegistry:
    # auto_describe=False: registering must not run a scrape (Redis may be down at start-up).
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, heartbeat_fresh_seconds))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
