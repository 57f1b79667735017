"""sha256 of local input files, remembered across jobs on one machine.

A base model is typically pruned against many fine-tunes, and every job's report names the
sha256 of each input shard: hashing an 8B base costs about 12 CPU-seconds per job. A file is
identified here the way git's index and ccache identify one, by (device, inode, size, mtime,
ctime) in nanoseconds: any write changes mtime and ctime, and ctime cannot be set back by a user,
so an entry can only match the very bytes it was computed from.

One small JSON file per entry, written atomically (temp file + rename), so concurrent workers
need no lock. `FAPM_DIGEST_CACHE` names the directory, or `off`; the default is
`$XDG_CACHE_HOME/fapm/digests` (`~/.cache/fapm/digests`). Any error reading or writing the cache
only means the file is hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from worker.errors import FapmError
from worker.io.safe_json import JsonLimits, load_json

_ENV = "FAPM_DIGEST_CACHE"
# An entry is {"key": ..., "sha256": ...}: anything larger was not written here.
_ENTRY_LIMITS = JsonLimits(max_bytes=4096, max_depth=1, max_values=8)


def cache_dir() -> Path | None:
    """The cache directory, or None when the cache is off."""
    configured = os.environ.get(_ENV)
    if configured is not None:
        if configured.strip().lower() in ("", "off", "0", "false", "no"):
            return None
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fapm" / "digests"


def file_key(stat: os.stat_result) -> str:
    """What identifies a file's bytes without reading them."""
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


def _entry(directory: Path, key: str) -> Path:
    return directory / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def lookup(key: str) -> str | None:
    """The remembered sha256 for `key`, or None."""
    directory = cache_dir()
    if directory is None:
        return None
    try:
        entry = load_json(_entry(directory, key).read_bytes(), key, _ENTRY_LIMITS, FapmError)
    except (OSError, FapmError):  # missing, or not what remember() writes: hash the file
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    digest = entry.get("sha256")
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def remember(key: str, digest: str) -> None:
    """Store a sha256 for `key` (best effort)."""
    directory = cache_dir()
    if directory is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as handle:
            json.dump({"key": key, "sha256": digest}, handle)
        os.replace(handle.name, _entry(directory, key))
    except OSError:
        pass
