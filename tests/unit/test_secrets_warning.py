"""The API says at start when webhook secrets will be stored in clear (FAPM_SECRETS_KEYS unset or
empty, as compose's `${FAPM_SECRETS_KEYS:-}` passes it), and says nothing once keys are set."""

from __future__ import annotations

import asyncio
import logging

import pytest
from cryptography.fernet import Fernet

from app.core.config import Settings
from app.main import create_app


def _started_with(keys: str | None, caplog) -> list[str]:
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", secrets_keys=keys))

    async def start_and_stop() -> None:
        async with app.router.lifespan_context(app):
            pass

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.main"):
        asyncio.run(start_and_stop())
    return [r.getMessage() for r in caplog.records if "FAPM_SECRETS_KEYS" in r.getMessage()]


@pytest.mark.parametrize("keys", [None, "", " , "])
def test_no_keys_is_said_at_start(keys, caplog):
    (message,) = _started_with(keys, caplog)
    assert "stored in clear" in message


def test_keys_set_say_nothing(caplog):
    assert _started_with(Fernet.generate_key().decode(), caplog) == []
