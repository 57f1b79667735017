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
PENDING_SUFFIX = ".new"  # a lock being set up (ScratchDir._create)


class ScratchDir:
    """A fresh directory `fapm-<kind>-XXXX` under `parent` (the temp dir), removed by `remove()`
    or on leaving a `with` block, and by `sweep_orphans` if its process dies first."""

    def __init__(self, kind: str, parent: str | Path | None = None) -> None:
        self._fd: int | None = None
        for _ in range(100):  # a name taken meanwhile (see _create) is tried again
            made = self._create(kind, Path(parent or tempfile.gettempdir()))
            if made is not None:
                self.path, self._lock_path, self._fd = made
                return
        raise FileExistsError(f"no free scratch directory name for {kind!r} under {parent}")

    @staticmethod
    def _create(kind: str, parent: Path) -> tuple[Path, Path, int] | None:
        """Lock first, then the directory: the directory never exists without its held lock,
        so a process killed at any point leaves nothing a sweep cannot judge (at worst a small
        pending lock file, which the sweep removes too). None if the name was taken meanwhile.

        The lock is created under a pending name and renamed into place once the directory
        exists: a sweeper only judges names ending in LOCK_SUFFIX (and pending ones it can lock),
        so it never finds a live directory's lock unlocked."""
        fd, pending_name = tempfile.mkstemp(
            prefix=f"{PREFIX}{kind}-", suffix=LOCK_SUFFIX + PENDING_SUFFIX, dir=parent
        )
        pending = Path(pending_name)
        path = pending.with_name(pending.name[: -len(LOCK_SUFFIX + PENDING_SUFFIX)])
        lock_path = path.with_name(path.name + LOCK_SUFFIX)
        made_dir = False
        try:
            os.set_inheritable(fd, False)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:  # an older scratch of this name, renamed lock and all
                pending.unlink(missing_ok=True)
                os.close(fd)
                return None
            made_dir = True
            # Fails if a sweeper removed the pending file between mkstemp and our flock (it
            # took the lock of what looked like a dead process's leftover): try another name.
            os.rename(pending, lock_path)
            return path, lock_path, fd
        except FileNotFoundError:
            if not made_dir:  # the temp dir itself is gone: nothing to retry
                pending.unlink(missing_ok=True)
                os.close(fd)
                raise
            os.rmdir(path)
            os.close(fd)
            return None
        except BaseException:
            if made_dir:
                shutil.rmtree(path, ignore_errors=True)
            pending.unlink(missing_ok=True)
            os.close(fd)
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
        if not name.startswith(PREFIX):
            continue
        if name.endswith(LOCK_SUFFIX + PENDING_SUFFIX):
            _sweep_pending(lock_path)
            continue
        if not name.endswith(LOCK_SUFFIX):
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


def _sweep_pending(pending: Path) -> None:
    """A lock still under its pending name: its process died before the lock was renamed, or
    is setting it up now (then it holds the lock, or will find the file gone and try another
    name: ScratchDir._create). Once it can be locked, the directory it may have made (empty:
    nothing is written before the rename) goes, then the file; while the file exists no other
    scratch can take its name."""
    try:
        fd = os.open(pending, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    else:
        directory = pending.with_name(pending.name[: -len(LOCK_SUFFIX + PENDING_SUFFIX)])
        try:
            directory.rmdir()  # only ever empty; a non-empty one is not ours and stays
        except OSError:
            pass
        pending.unlink(missing_ok=True)
    finally:
        os.close(fd)
