"""The API and each worker process say as they start (when they build their JobStore from the
settings: app/api/services.py, worker/tasks/store.py) that webhook secrets will be stored in
clear when FAPM_SECRETS_KEYS holds no key (unset, or empty as compose's `${FAPM_SECRETS_KEYS:-}`
passes it), and say nothing once keys are set."""

from __future__ import annotations

import logging

import pytest
from cryptography.fernet import Fernet

from app.core.config import Settings
from app.jobs.store import JobStore
from app.main import create_app


def _warnings(keys: str | None, caplog, build) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.jobs.store"):
        build(Settings(redis_url="redis://127.0.0.1:1/0", secrets_keys=keys))
    return [r.getMessage() for r in caplog.records if "FAPM_SECRETS_KEYS" in r.getMessage()]


@pytest.mark.parametrize("build", [create_app, JobStore.from_settings], ids=["api", "worker"])
@pytest.mark.parametrize("keys", [None, "", " , "])
def test_no_keys_is_said_at_start(keys, build, caplog):
    (message,) = _warnings(keys, caplog, build)
    assert "stored in clear" in message


@pytest.mark.parametrize("build", [create_app, JobStore.from_settings], ids=["api", "worker"])
def test_keys_set_say_nothing(build, caplog):
    assert _warnings(Fernet.generate_key().decode(), caplog, build) == []
