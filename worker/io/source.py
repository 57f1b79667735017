"""Model sources: one model directory that can list its files and read byte ranges.

The engine reads checkpoints only through this interface, so S3 (ranged GETs) and the Hub can be
added as sources without touching the engine. Reads fill caller-provided buffers so a tensor's
bytes are copied once, from the file into the tensor that the engine computes on.

A service job's local reads are confined to its tenant's roots: the worker calls
`confine_local_reads` before the job opens anything, each LocalDirSource takes the roots when it
is created, and every file it opens (weights, config, tokenizer and adapter files, evaluation
sets) is checked by the real path of the open descriptor, so a symlink inside a root that leads
out of it (or is swapped in after a check) fails the job with `invalid_location` naming the file
before a byte of it is read. The CLI never confines: it reads the user's own disk.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path

from worker.errors import InvalidLocation, SourceNotFound

# Most entries (files, folders) a source looks at when it lists a directory (its top level at
# open, or the whole tree when the repo is carried over): listing is lazy and stops here, so a
# prefix or tree of millions of files is neither listed whole nor held in memory. Five times
# carry-over's cap on files carried (10,000): room for the weights, `.git` and the rest that is
# left out.
MAX_LISTED_FILES = 50_000


class TooManyFiles(Exception):
    """Raised by `iter_files` once it has looked at MAX_LISTED_FILES entries: what it yielded
    so far stands, the rest of the directory was not listed. The message says so for a report."""

    def __init__(self, uri: str) -> None:
        super().__init__(
            f"{uri}: more than {MAX_LISTED_FILES:,} files and folders; listing stopped there"
        )


# The local roots the current job may read under; None: anywhere (the CLI).
_READ_ROOTS: ContextVar[tuple[Path, ...] | None] = ContextVar("fapm_read_roots", default=None)


def confine_local_reads(roots: Sequence[Path] | None) -> None:
    """From now on in this context (the job being run), local sources open files only under
    `roots` (real paths); None lifts the confinement."""
    _READ_ROOTS.set(None if roots is None else tuple(Path(r) for r in roots))


@contextlib.contextmanager
def also_readable(directory: Path) -> Iterator[None]:
    """Within the block, a confined job may also read under `directory`: a local copy the job
    made itself (a remote model copied for evaluation)."""
    roots = _READ_ROOTS.get()
    if roots is None:
        yield
        return
    token = _READ_ROOTS.set((*roots, Path(directory).resolve()))
    try:
        yield
    finally:
        _READ_ROOTS.reset(token)


def _within(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _opened_path(fd: int, path: Path) -> Path:
    """The real path of the file open at `fd` (what is read, whatever symlinks led to it)."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:  # no /proc: the path as it resolves now, if that is still the opened file
        real = Path(os.path.realpath(path))
        if os.path.samestat(os.stat(real), os.fstat(fd)):
            return real
        raise InvalidLocation(f"{path}: changed while it was opened") from None


def open_local_file(path: Path, roots: tuple[Path, ...] | None) -> int:
    """A read-only descriptor of the regular file at `path`; with `roots`, InvalidLocation
    (naming the file) unless what was opened lies under one of them. The check is on the open
    descriptor, so nothing can be swapped in between the check and the reads."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK  # a FIFO must not block
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SourceNotFound(f"{path}: no such file") from None
    try:
        if roots is not None and not _within(_opened_path(fd, path), roots):
            raise InvalidLocation(
                f"{path}: leads outside the locations this job may read (a symlink?); not read"
            )
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceNotFound(f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


class ModelSource(ABC):
    """A model directory: its file names (top level for the weights, every nested file for
    carrying the repo over), their sizes, and byte-range reads. A nested file's name is its
    path under the directory with `/` separators (`1_Pooling/config.json`)."""

    uri: str
    # Remote sources pay for every byte read: the engine then never reads bytes only to hash them.
    remote = False
    # map_range gives zero-copy views (local files).
    can_map = False

    @abstractmethod
    def files(self) -> list[str]:
        """Names of the files in the directory (not recursive), sorted."""

    def iter_files(self) -> Iterator[str]:
        """Names of every file under the directory, nested ones as `folder/name`, listed lazily
        (in no promised order): what the caller does not consume is never listed, and past
        MAX_LISTED_FILES entries looked at it raises TooManyFiles. Names come from the store as
        they are: callers that write them as paths check them."""
        yield from _capped(self.files(), self.uri)

    @abstractmethod
    def size(self, name: str) -> int:
        """Size of a file in bytes."""

    @abstractmethod
    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with the file's bytes starting at `offset`; raise on a short read."""

    def stat(self, name: str) -> os.stat_result | None:
        """The file's stat where the store has one (local files), else None."""
        return None

    def map_range(self, name: str, offset: int, length: int) -> memoryview | None:
        """A zero-copy, writable (copy-on-write) view of a byte range where the store allows one
        (a local file: pages come straight from the page cache, no copy into a fresh buffer);
        None where it does not, and the caller reads into a buffer instead."""
        return None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(name, offset, memoryview(buffer))
        return bytes(buffer)

    def read_file(self, name: str) -> bytes:
        """A whole (small) file: config, tokenizer, adapter config."""
        return self.read_range(name, 0, self.size(name))

    def exists(self, name: str) -> bool:
        return name in self.files()

    def release(self, name: str) -> None:  # noqa: B027 - optional hook
        """Close what reading `name` holds open: a file read once (carried over) need not stay
        open for the rest of the job."""

    def identity(self) -> dict[str, object]:
        """What identifies this input in a report: its URI and, where there is one, revision."""
        return {"uri": self.uri, "revision": None}

    def stored_digest(self, name: str) -> str:
        """A digest the store keeps for a file (`etag:...`, `sha256:...`), for remote sources."""
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release handles; the default holds none."""


class ListedSource(ModelSource):
    """A remote directory whose file names and sizes are listed by the store (an S3 prefix, a
    Hub repo at one commit): subclasses fill `_sizes` with every file they have listed, the top
    level when they open (a Hub repo: every file, nested ones included, in one answer) and
    nested files as `iter_files` lists them."""

    remote = True
    _sizes: dict[str, int]

    def files(self) -> list[str]:
        return sorted(name for name in self._sizes if "/" not in name)

    def iter_files(self) -> Iterator[str]:
        yield from _capped(sorted(self._sizes), self.uri)

    def size(self, name: str) -> int:
        try:
            return self._sizes[name]
        except KeyError:
            raise SourceNotFound(f"{self.uri.rstrip('/')}/{name}: no such file") from None

    def check_range(self, name: str, offset: int, length: int) -> None:
        """Refuse a read past the listed size before asking the store for it."""
        if offset + length > self.size(name):
            raise SourceNotFound(
                f"{self.uri.rstrip('/')}/{name}: file ends at byte {self.size(name)}, "
                f"expected {offset + length} (truncated?)"
            )


def _capped(names: Iterable[str], uri: str) -> Iterator[str]:
    for count, name in enumerate(names):
        if count == MAX_LISTED_FILES:
            raise TooManyFiles(uri)
        yield name


def byte_view(buffer: memoryview) -> memoryview:
    return buffer.cast("B") if buffer.format != "B" else buffer


def pread_exactly(fd: int, offset: int, view: memoryview, where: str) -> None:
    """Fill `view` from `fd` at `offset` with pread (no shared file position between threads)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise SourceNotFound(
                f"{where}: file ended at byte {offset + done}, "
                f"expected {offset + len(view)} (truncated?)"
            )
        done += got


class LocalDirSource(ModelSource):
    """A directory on local disk, mapped or read with pread (no file position shared between
    threads)."""

    can_map = True

    def __init__(self, path: str | os.PathLike[str], uri: str | None = None) -> None:
        self.path = Path(path)
        self.uri = uri or f"file://{self.path.resolve()}"
        self.roots = _READ_ROOTS.get()  # kept: the reading threads have contexts of their own
        if self.roots is not None and not _within(self.path.resolve(), self.roots):
            raise InvalidLocation(f"{self.path}: outside the locations this job may read")
        if not self.path.exists():
            raise SourceNotFound(f"{self.path}: no such directory")
        if not self.path.is_dir():
            raise SourceNotFound(f"{self.path}: not a directory (give the model's directory)")
        self._fds: dict[str, int] = {}
        self._fds_lock = threading.Lock()  # the engine and the input-digest thread both read
        self._files = sorted(p.name for p in self.path.iterdir() if p.is_file())

    def files(self) -> list[str]:
        return list(self._files)

    def iter_files(self) -> Iterator[str]:
        """Every regular file below the directory, through symlinks to files (each is checked
        against the job's roots when it is opened, as any file is); symlinked folders are not
        entered (a cycle, or a tree outside the model). Read entry by entry as it is consumed
        (os.walk would read a whole folder first), so a folder of millions of files costs
        MAX_LISTED_FILES entries at most."""
        looked_at = 0
        folders = [""]  # relative paths of the folders still to list ("" is the directory)
        while folders:
            folder = folders.pop()
            try:
                entries = os.scandir(self.path / folder)
            except OSError:  # gone or unreadable since it was listed, as os.walk skips it
                continue
            with entries:
                for entry in entries:
                    looked_at += 1
                    if looked_at > MAX_LISTED_FILES:
                        raise TooManyFiles(self.uri)
                    name = f"{folder}/{entry.name}" if folder else entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            folders.append(name)
                        elif entry.is_file():  # a regular file, or a symlink to one
                            yield name
                    except OSError:  # a dangling symlink: nothing to read
                        continue

    def size(self, name: str) -> int:
        return os.fstat(self._fd(name)).st_size

    def _fd(self, name: str) -> int:
        with self._fds_lock:
            fd = self._fds.get(name)
            if fd is None:
                fd = open_local_file(self.path / name, self.roots)
                self._fds[name] = fd
            return fd

    def descriptor(self, name: str) -> int:
        """The open, checked descriptor of `name` (valid until the source is closed)."""
        return self._fd(name)

    def verify_files(self) -> None:
        """Open (and so check) every file of the directory now: for readers that take the
        directory's path rather than this source (transformers, in evaluation)."""
        for name in self._files:
            self._fd(name)

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        pread_exactly(self._fd(name), offset, byte_view(buffer), str(self.path / name))

    def stat(self, name: str) -> os.stat_result | None:
        return os.fstat(self._fd(name))

    def map_range(self, name: str, offset: int, length: int) -> memoryview | None:
        # Private mapping: the engine never writes its inputs, and a stray write would stay in
        # this process. The view keeps the mapping alive; it is unmapped when the last user goes.
        # The size check comes first because a mapping past the end of a file faults (SIGBUS) on
        # access; a file truncated while a job reads it can still do that, as with safetensors.
        fd = self._fd(name)
        size = os.fstat(fd).st_size
        if offset + length > size:
            raise SourceNotFound(
                f"{self.path / name}: file ended at byte {size}, "
                f"expected {offset + length} (truncated?)"
            )
        if length == 0:
            return None
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, offset + length - start, offset=start, access=mmap.ACCESS_COPY)
        mapped.madvise(mmap.MADV_WILLNEED)  # a cold file: start reading it all now
        return memoryview(mapped)[offset - start :]

    def release(self, name: str) -> None:
        with self._fds_lock:
            fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._fds_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
