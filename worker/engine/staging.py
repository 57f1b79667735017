"""Atomic publication of a local output directory.

Everything is written into a hidden staging directory beside the output and renamed into place only
when complete, so a failed, cancelled or killed run leaves nothing at the output path.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from worker.errors import OutputExists

STAGING_MARK = ".fapm-staging-"


class StagingDir:
    def __init__(self, output: Path, overwrite: bool) -> None:
        self.output = output
        self.overwrite = overwrite
        if output.exists() and not overwrite:
            raise OutputExists(f"{output} already exists; pass --overwrite to replace it")
        output.parent.mkdir(parents=True, exist_ok=True)
        self.path = output.parent / f".{output.name}{STAGING_MARK}{uuid.uuid4().hex[:12]}"
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
