"""API keys: which tenant a request acts for.

Keys come from `FAPM_API_KEYS` (`tenant:key,...`, small deployments) and/or `FAPM_API_KEYS_FILE`
(`tenant:sha256hex` lines, so the server never holds a key in clear). Either way the table keeps
only SHA-256 digests. A presented key is hashed and compared with every entry by
`hmac.compare_digest`, without stopping at the first match, so the answer time says nothing about
which key (or how much of one) was right.

The table is parsed once and re-read only when the keys file changes (its mtime), so a
submission pays one hash and a handful of 32-byte comparisons, not a file read.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from app.core.config import Settings

log = logging.getLogger("app.security")

_HEX = frozenset("0123456789abcdef")


def key_digest(key: str) -> bytes:
    """SHA-256 of a key: what the table and the keys file hold."""
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class KeyTable:
    entries: tuple[tuple[bytes, str], ...]  # (sha256 digest, tenant)

    def tenant_for(self, key: str) -> str | None:
        """The tenant whose key this is, or None. Every entry is compared (constant time)."""
        digest = key_digest(key)
        found: str | None = None
        for candidate, tenant in self.entries:
            if hmac.compare_digest(candidate, digest) and found is None:
                found = tenant
        return found


def parse_inline_keys(raw: str) -> list[tuple[bytes, str]]:
    """`tenant:key,tenant:key` -> digests. Malformed items raise ValueError (without the key)."""
    out = []
    for number, item in enumerate(raw.split(","), start=1):
        item = item.strip()
        if not item:
            continue
        tenant, sep, key = item.partition(":")
        if not sep or not tenant.strip() or not key.strip():
            raise ValueError(f"FAPM_API_KEYS item {number} is not tenant:key")
        out.append((key_digest(key.strip()), tenant.strip()))
    return out


def parse_keys_file(path: Path) -> list[tuple[bytes, str]]:
    """`tenant:sha256hex` lines ('#' comments and blank lines ignored)."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tenant, sep, hexdigest = line.partition(":")
        hexdigest = hexdigest.strip().lower()
        if not sep or not tenant.strip() or len(hexdigest) != 64 or not set(hexdigest) <= _HEX:
            raise ValueError(f"{path}:{number}: expected tenant:<64 hex digits of sha256(key)>")
        out.append((bytes.fromhex(hexdigest), tenant.strip()))
    return out


class KeyRing:
    """The key table for one Settings, reloaded when the keys file's mtime changes."""

    def __init__(self, settings: Settings) -> None:
        self._inline = (
            parse_inline_keys(settings.api_keys.get_secret_value()) if settings.api_keys else []
        )
        self._file = settings.api_keys_file
        self._lock = threading.Lock()
        self._mtime: tuple[int, int] | None = None
        self._table = KeyTable(tuple(self._inline))
        if self._file is not None:
            self._reload()

    def _reload(self) -> None:
        assert self._file is not None
        try:
            stat = os.stat(self._file)
            mtime = (stat.st_mtime_ns, stat.st_size)
        except OSError as exc:
            # Keep the last good table: a key file being replaced must not lock everyone out.
            log.error("API keys file %s unreadable: %s", self._file, exc.strerror)
            return
        if mtime == self._mtime:
            return
        with self._lock:
            if mtime == self._mtime:
                return
            try:
                from_file = parse_keys_file(self._file)
            except (OSError, ValueError) as exc:
                log.error("API keys file not loaded: %s", exc)
                return
            self._table = KeyTable(tuple(self._inline + from_file))
            self._mtime = mtime
            log.info("loaded %d API key hashes from %s", len(from_file), self._file)

    def table(self) -> KeyTable:
        if self._file is not None:
            self._reload()
        return self._table

    def tenant_for(self, key: str) -> str | None:
        return self.table().tenant_for(key)
