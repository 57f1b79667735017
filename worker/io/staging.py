"""Atomic publication of a local output directory.

Everything is written into a hidden staging directory beside the output and renamed into place only
when complete, so a failed, cancelled or killed run leaves nothing at the output path.

A service job names its staging directories after the job id, so the next attempt of a job whose
worker was killed finds and removes the dead attempt's leftovers before it starts. Each attempt
still gets its own directory: a stalled earlier attempt that wakes up and aborts removes only its
own, never the live one's.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from worker.errors import OutputExists

STAGING_MARK = ".fapm-staging-"


def job_staging_prefix(output: Path, job_id: str) -> str:
    """Name prefix of every staging directory of `job_id` for `output` (one per attempt)."""
    return f".{output.name}{STAGING_MARK}{job_id}-"


class StagingDir:
    def __init__(self, output: Path, overwrite: bool, job_id: str | None = None) -> None:
        self.output = output
        self.overwrite = overwrite
        if output.exists() and not overwrite:
            raise OutputExists(f"{output} already exists; pass --overwrite to replace it")
        output.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{output.name}{STAGING_MARK}"
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
        if self.output.exists():
            if not self.overwrite:  # appeared while we were working
                raise OutputExists(f"{self.output} appeared while the job ran; not replaced")
            trash = self.path.with_name(self.path.name + "-old")
            os.rename(self.output, trash)
            os.rename(self.path, self.output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.path, self.output)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
