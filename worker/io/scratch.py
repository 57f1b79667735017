"""Scratch directories that a killed process cannot leak.

A job's scratch (a remote output staged before its upload, a remote model copied for evaluation,
the hidden states of weight pruning) is a directory under the system's temp dir, often gigabytes.
A worker process killed by SIGKILL (the OOM killer, a hard time limit) never runs its cleanup,
and its pool starts a new process: without a sweep the directory would stay until the disk fills.

So each scratch directory `fapm-<kind>-XXXX` has a lock file beside it, `fapm-<kind>-XXXX.lock`,
that its process holds flock'ed for the directory's life. The kernel drops a flock when its
process dies, however it dies, so a lock that can be taken is an owner that is gone:
`sweep_orphans` (run as each worker pool process starts) removes those directories. A live
process's directory is never touched, whichever process sweeps, and pid reuse cannot confuse it.

The lock file lies beside the directory, not in it, so the directory holds only the job's files
(an output's staged files are uploaded as they are listed).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

PREFIX = "fapm-"
LOCK_SUFFIX = ".lock"


class ScratchDir:
    """A fresh directory `fapm-<kind>-XXXX` under `parent` (the temp dir), removed by `remove()`
    or on leaving a `with` block, and by `sweep_orphans` if its process dies first."""

    def __init__(self, kind: str, parent: str | Path | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-", dir=parent))
        self._lock_path = self.path.with_name(self.path.name + LOCK_SUFFIX)
        # Locked under another name, then renamed into place: a sweeper only opens names ending in
        # LOCK_SUFFIX, so it never finds the lock of a live directory unlocked.
        pending = self.path.with_name(self.path.name + LOCK_SUFFIX + ".new")
        try:
            self._fd: int | None = os.open(pending, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            os.rename(pending, self._lock_path)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            pending.unlink(missing_ok=True)
            raise

    def remove(self) -> None:
        """Remove the directory, then give up the lock (safe to call twice)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            self._lock_path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()


def sweep_orphans(parent: str | Path | None = None) -> list[Path]:
    """Remove the scratch directories under `parent` (the temp dir) whose process is gone;
    returns what was removed. Directories of live processes, and anything that is not a locked
    scratch directory, are left alone."""
    root = Path(parent or tempfile.gettempdir())
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for lock_path in entries:
        name = lock_path.name
        if not (name.startswith(PREFIX) and name.endswith(LOCK_SUFFIX)):
            continue
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:  # removed meanwhile by its owner, or not ours to open
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            directory = lock_path.with_name(name[: -len(LOCK_SUFFIX)])
            if directory.is_dir() and not directory.is_symlink():
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory)
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d scratch directories of dead processes: %s", len(removed), removed)
    return removed
