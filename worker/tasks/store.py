"""The worker process's JobStore (one Redis connection pool per process, made on first use, so
each prefork child builds its own after the fork)."""

from __future__ import annotations

from functools import lru_cache

from app.core.config import get_settings
from app.jobs.store import JobStore


@lru_cache
def job_store() -> JobStore:
    return JobStore.from_settings(get_settings())
