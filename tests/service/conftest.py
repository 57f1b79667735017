"""Fixtures for the service tests: real redis-server, uvicorn and Celery worker processes on free
loopback ports (worker/localstack.py), and tiny model pairs inside the allowed local root.

`api_stack` is Redis + API (no worker: jobs stay queued); `service` adds one Celery worker. Both
are session-wide; tests isolate themselves by tenant or by the job ids they create.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.models import ModelPair, make_llama_pair
from worker.localstack import LocalStack

API_KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-9876543210"}
HF_WEBHOOK_SECRET = "hub-secret-for-tests"

# Short timings so retries, leases and heartbeats play out within a test.
FAST_ENV = {
    "FAPM_API_KEYS": ",".join(f"{tenant}:{key}" for tenant, key in API_KEYS.items()),
    "FAPM_WEBHOOK_ALLOW": "127.0.0.1,localhost",
    "FAPM_HEARTBEAT_SECONDS": "1",
    "FAPM_HEARTBEAT_FRESH_SECONDS": "5",
    "FAPM_LEASE_SECONDS": "6",
    "FAPM_PROGRESS_INTERVAL_SECONDS": "0.05",
    "FAPM_WEBHOOK_FIRST_RETRY_SECONDS": "0.3",
    "FAPM_WEBHOOK_RETRY_SECONDS": "60",
    "FAPM_HF_WEBHOOK_SECRET": HF_WEBHOOK_SECRET,
}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEYS[tenant]}"}


@pytest.fixture(scope="session")
def local_root(tmp_path_factory) -> Path:
    """The one directory FAPM_LOCAL_ROOTS allows: models and outputs live under it."""
    return tmp_path_factory.mktemp("local_root").resolve()


@pytest.fixture(scope="session")
def service_pair(local_root) -> ModelPair:
    return make_llama_pair(local_root / "pair", dtype=torch.bfloat16, seed=11)


def _stack(workdir: Path, local_root: Path, extra_env: dict[str, str] | None = None) -> LocalStack:
    env = {**FAST_ENV, "FAPM_LOCAL_ROOTS": str(local_root), **(extra_env or {})}
    return LocalStack(workdir, env=env)


@pytest.fixture(scope="session")
def api_stack(tmp_path_factory, local_root) -> Iterator[LocalStack]:
    """Redis and the API; no worker, so submitted jobs stay queued."""
    stack = _stack(tmp_path_factory.mktemp("api_stack"), local_root)
    stack.workdir.mkdir(parents=True, exist_ok=True)
    try:
        stack.start_redis()
        stack.start_api()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def service(tmp_path_factory, local_root) -> Iterator[LocalStack]:
    """Redis, the API and one Celery worker."""
    stack = _stack(tmp_path_factory.mktemp("service"), local_root)
    try:
        stack.start(workers=1)
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def make_stack(tmp_path, local_root) -> Iterator:
    """A private stack for tests that kill or reconfigure processes: make_stack(**env)."""
    stacks: list[LocalStack] = []

    def make(**extra_env: str) -> LocalStack:
        stack = _stack(tmp_path / f"stack{len(stacks)}", local_root, extra_env)
        stack.workdir.mkdir(parents=True, exist_ok=True)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def client(stack: LocalStack, tenant: str | None = "alice") -> httpx.Client:
    headers = auth(tenant) if tenant else {}
    return httpx.Client(base_url=stack.api_url, headers=headers, timeout=30)
