"""Atomic publication of a local output directory.

Everything is written into a hidden staging directory beside the output and renamed into place only
when complete, so a failed, cancelled or killed run leaves nothing at the output path.

A service job names its staging directories after the job id, so the next attempt of a job whose
worker was killed finds and removes the dead attempt's leftovers before it starts. Each attempt
still gets its own directory: a stalled earlier attempt that wakes up and aborts removes only its
own, never the live one's.

Staging names stay far below the file system's 255-byte limit whatever the output's name (a long
name enters as a short prefix and a hash), and an output whose own name cannot exist is refused
before anything is written. `overwrite` replaces only a model fapm published (publish.py,
`check_replaceable`), checked when the directory is opened and again right before the rename.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from app.core.netguard import check_name_length
from worker.errors import InvalidOutput, OutputExists

STAGING_MARK = ".fapm-staging-"
# An output name longer than this (in bytes) enters staging names as a prefix and a hash.
_STAGING_NAME_BYTES = 64


def staging_stem(output: Path) -> str:
    """The output's name as it appears in its staging names: itself when short, else its first
    bytes and a hash of the whole (distinct outputs keep distinct staging names)."""
    name = output.name
    encoded = os.fsencode(name)
    if len(encoded) <= _STAGING_NAME_BYTES:
        return name
    head = encoded[:32].decode("utf-8", errors="ignore")  # never half a character
    return f"{head}~{hashlib.sha256(encoded).hexdigest()[:16]}"


def job_staging_prefix(output: Path, job_id: str) -> str:
    """Name prefix of every staging directory of `job_id` for `output` (one per attempt)."""
    return f".{staging_stem(output)}{STAGING_MARK}{job_id}-"


class StagingDir:
    def __init__(self, output: Path, overwrite: bool, job_id: str | None = None) -> None:
        from worker.io.publish import check_replaceable

        self.output = output
        self.overwrite = overwrite
        try:
            check_name_length(output)
        except ValueError as exc:
            raise InvalidOutput(str(exc)) from None
        if output.exists() or output.is_symlink():
            if not overwrite:
                raise OutputExists(f"{output} already exists; pass --overwrite to replace it")
            check_replaceable(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{staging_stem(output)}{STAGING_MARK}"
        if job_id is not None:
            prefix = job_staging_prefix(output, job_id)
            # Leftovers of an earlier attempt of this job (its worker was killed).
            for leftover in output.parent.iterdir():
                if leftover.name.startswith(prefix):
                    shutil.rmtree(leftover, ignore_errors=True)
        self.path = output.parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        self.path.mkdir()

    def commit(self) -> None:
        """Move the finished staging directory to the output path."""
        from worker.io.publish import check_replaceable

        if self.output.exists() or self.output.is_symlink():
            if not self.overwrite:  # appeared while we were working
                raise OutputExists(f"{self.output} appeared while the job ran; not replaced")
            check_replaceable(self.output)  # it may have changed while the job ran
            trash = self.path.with_name(self.path.name + "-old")
            os.rename(self.output, trash)
            os.rename(self.path, self.output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.path, self.output)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
