"""Sealing secrets at rest: a job's webhook URL (its query often carries a token) and signing
secret are encrypted with a server key before they are written to Redis, whose AOF and backups
would otherwise hold them in clear.

The keys come from FAPM_SECRETS_KEYS, comma-separated Fernet keys
(`cryptography.fernet.Fernet.generate_key()`). The first seals; every one of them unseals
(MultiFernet), so a key is rotated by putting the new one first and dropping the old one once no
record sealed with it is still owed a delivery (records expire after FAPM_JOB_TTL_SECONDS).

A sealed value is `sealed:v1:<Fernet token>`. A value without the prefix is read as it is: a
record written before the setting was set (or without it) still reads. Without keys nothing is
sealed, as before the setting existed. A sealed value that this process cannot open (no keys, or
none of them sealed it) is an UnsealError naming the setting, never the ciphertext passed on as
if it were the URL or the secret. (A secret that itself begins with `sealed:v1:` would be taken
for a sealed one; no real signing secret does.)
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

SETTING = "FAPM_SECRETS_KEYS"
SEALED_PREFIX = "sealed:v1:"


class UnsealError(ValueError):
    """A sealed value this process's FAPM_SECRETS_KEYS cannot open."""


def parse_keys(value: str) -> list[str]:
    """The keys of a FAPM_SECRETS_KEYS value, each checked to be a Fernet key. The error names
    the key's position, never the key, so it can be logged."""
    keys = [item.strip() for item in value.split(",") if item.strip()]
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise ValueError(
                f"{SETTING}: key {position} of {len(keys)} is not a Fernet key (32 url-safe "
                "base64-encoded bytes, as cryptography.fernet.Fernet.generate_key() makes)"
            ) from None
    return keys


class Sealer:
    """Seals and unseals with a list of keys (the first seals); with none it passes text through."""

    def __init__(self, keys: Sequence[str] = ()) -> None:
        self._fernet = MultiFernet([Fernet(key) for key in keys]) if keys else None

    @classmethod
    def from_setting(cls, value: str | None) -> Sealer:
        """The sealer of a FAPM_SECRETS_KEYS value (None or empty: no sealing)."""
        return cls(parse_keys(value or ""))

    @property
    def enabled(self) -> bool:
        return self._fernet is not None

    def seal(self, text: str) -> str:
        """The value to store: sealed with the first key, or `text` itself without keys."""
        if self._fernet is None:
            return text
        return SEALED_PREFIX + self._fernet.encrypt(text.encode()).decode("ascii")

    def unseal(self, stored: str) -> str:
        """The value that was stored: opened if sealed, as it is if it was stored in clear."""
        if not stored.startswith(SEALED_PREFIX):
            return stored
        if self._fernet is None:
            raise UnsealError(f"the value is sealed and {SETTING} is not set in this process")
        try:
            return self._fernet.decrypt(stored[len(SEALED_PREFIX) :].encode()).decode()
        except (InvalidToken, UnicodeDecodeError):
            raise UnsealError(
                f"the value was sealed with a key that {SETTING} does not hold"
            ) from None
