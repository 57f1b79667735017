"""app.core.sealing: what FAPM_SECRETS_KEYS seals, what it opens after a rotation, and the errors
(naming the setting, never quoting a key) for a value it cannot open or a key it cannot use."""

from __future__ import annotations

import json

import pydantic
import pytest
from cryptography.fernet import Fernet

from app.core.config import Settings
from app.core.sealing import SEALED_PREFIX, Sealer, UnsealError

KEY_A, KEY_B = Fernet.generate_key().decode(), Fernet.generate_key().decode()
URL = "https://hooks.example/fapm?token=tok-0a1b2c3d"


def test_a_sealed_value_carries_the_prefix_and_not_the_text_and_opens_again():
    sealer = Sealer([KEY_A])
    sealed = sealer.seal(URL)
    assert sealed.startswith(SEALED_PREFIX)
    assert "tok-0a1b2c3d" not in sealed and "hooks.example" not in sealed
    assert sealer.seal(URL) != sealed  # a fresh IV each time: equal texts do not show as equal
    assert sealer.unseal(sealed) == URL


def test_without_keys_text_is_stored_and_read_as_it_is():
    sealer = Sealer.from_setting(None)
    assert not sealer.enabled
    assert sealer.seal(URL) == URL
    assert sealer.unseal(URL) == URL


def test_a_value_stored_in_clear_reads_once_keys_are_set():
    assert Sealer([KEY_A]).unseal(URL) == URL


def test_rotation_the_first_key_seals_and_every_key_opens():
    old = Sealer.from_setting(KEY_A).seal(URL)
    rotated = Sealer.from_setting(f"{KEY_B}, {KEY_A}")
    assert rotated.unseal(old) == URL
    new = rotated.seal(URL)
    assert Sealer([KEY_B]).unseal(new) == URL  # sealed with B, the first
    with pytest.raises(UnsealError):
        Sealer([KEY_A]).unseal(new)


def test_a_sealed_value_without_keys_or_with_another_key_is_an_error_naming_the_setting():
    sealed = Sealer([KEY_A]).seal(URL)
    with pytest.raises(UnsealError, match="FAPM_SECRETS_KEYS is not set"):
        Sealer().unseal(sealed)
    with pytest.raises(UnsealError, match="FAPM_SECRETS_KEYS does not hold"):
        Sealer([KEY_B]).unseal(sealed)
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(UnsealError):
        Sealer([KEY_A]).unseal(tampered)


def test_a_setting_with_a_bad_key_is_refused_at_start_without_quoting_it():
    bad = "not-a-fernet-key-but-a-secret-all-the-same"
    with pytest.raises(pydantic.ValidationError) as caught:
        Settings(secrets_keys=f"{KEY_A},{bad}")
    message = str(caught.value)
    assert "FAPM_SECRETS_KEYS: key 2 of 2 is not a Fernet key" in message
    assert bad not in message and KEY_A[:8] not in message
    # A short setting is not cut short by pydantic's message: nothing of the good key shows.
    with pytest.raises(pydantic.ValidationError) as caught:
        Settings(secrets_keys=f"{KEY_A},bad")
    assert KEY_A[:8] not in str(caught.value) and "key 2 of 2" in str(caught.value)
    assert Settings(secrets_keys=f"{KEY_B},{KEY_A}").secrets_keys is not None


def test_a_secret_that_would_read_as_sealed_is_refused_at_submission():
    from pydantic import ValidationError

    from app.jobs.records import WebhookRequest

    with pytest.raises(ValidationError, match="may not start with"):
        WebhookRequest(url="https://example.com/hook", secret=SEALED_PREFIX + "abc")
    assert WebhookRequest(url="https://example.com/hook", secret="whsec_abc").secret


def test_a_refused_rule_is_named_without_echoing_its_values():
    """A rules file's error reaches logs and the webhook's 503: it names the field, never the
    rule's values (a webhook URL token, a secret)."""
    from app.jobs.hub_rules import HubRulesError, parse_rules

    text = json.dumps([{"repo": "acme/*", "tenant": "acme", "base": "hf://acme/base",
                        "output": "s3://out/{name}/", "sparsity": "nine-tenths-tok-5ecret",
                        "webhook": {"url": "https://hooks.example.com/x?token=tok-5ecret"}}])  # fmt: skip
    with pytest.raises(HubRulesError, match=r"rule 1: sparsity") as caught:
        parse_rules(text, "rules.json")
    assert "tok-5ecret" not in str(caught.value)
