"""Hugging Face Hub model repos: `hf://org/name[@revision]` through huggingface_hub.

The revision (branch, tag or commit) is resolved to a commit SHA when the source opens, and every
read after that names the commit, so a push during the job cannot mix two versions. The
safetensors headers are read by small HTTP range requests, so the engine's plan (which compares
the two models' names, shapes and dtypes) fails a mismatched pair before any weights download.
A weight file is downloaded whole into the Hub cache (`HF_HUB_CACHE`) on its first tensor read,
and reused from the cache on later jobs; files the job never reads are never fetched.

`HF_TOKEN`, `HF_ENDPOINT`, `HF_HUB_CACHE` and `HF_HUB_OFFLINE` are honoured as huggingface_hub
honours them; with HF_HUB_OFFLINE=1 everything comes from the cache.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import HfApi, constants, errors, hf_hub_download, snapshot_download
from huggingface_hub.utils import build_hf_headers, get_session

from worker.errors import (
    AccessDenied,
    FapmError,
    InvalidLocation,
    SourceNotFound,
    SourceUnavailable,
)
from worker.io.source import ListedSource, byte_view, pread_exactly

# Reads up to this size of a file not yet in the cache go over HTTP ranges (headers, index
# files); anything larger downloads the file into the cache first.
RANGE_READ_LIMIT = 1 * 2**20


def hub_error(exc: Exception, where: str) -> FapmError:
    """huggingface_hub's exceptions -> job errors with stable codes."""
    if isinstance(exc, FapmError):
        return exc
    if isinstance(exc, errors.HFValidationError):
        return InvalidLocation(f"{where}: not a valid Hub repo id or revision ({exc})")
    if isinstance(exc, errors.RevisionNotFoundError):
        return SourceNotFound(f"{where}: the revision does not exist on the Hub")
    if isinstance(exc, errors.GatedRepoError):
        return AccessDenied(f"{where}: the repo is gated; accept its terms and set HF_TOKEN")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return SourceNotFound(
            f"{where}: no such repo on the Hub (or it is private and HF_TOKEN cannot see it)"
        )
    if isinstance(exc, errors.EntryNotFoundError | errors.RemoteEntryNotFoundError):
        return SourceNotFound(f"{where}: no such file in the repo")
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return SourceUnavailable(
            f"{where}: not in the Hub cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE=1, or no network)"
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return AccessDenied(f"{where}: the Hub refused HF_TOKEN ({status})")
    return SourceUnavailable(f"{where}: the Hub did not answer: {exc}")


@contextlib.contextmanager
def hub_calls(where: str) -> Iterator[None]:
    """Calls to the Hub inside fail as job errors (`hub_error`): huggingface_hub raises its own
    errors, and its HTTP client's (connection refused, timeouts, TLS) when the Hub is
    unreachable."""
    try:
        yield
    except Exception as exc:
        raise hub_error(exc, where) from exc


class HubSource(ListedSource):
    """One model repo at one commit: its weights at the top level, every file (nested ones as
    `folder/name`) for carrying the repo over."""

    def __init__(self, uri: str, repo_id: str, revision: str | None) -> None:
        self.uri = uri
        self.repo_id = repo_id
        self.requested_revision = revision or "main"
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._digests: dict[str, str] = {}
        with hub_calls(uri):
            if constants.is_offline_mode():
                self._open_from_cache()
            else:
                self._open_from_hub()
        if not self.files():
            raise SourceNotFound(f"{uri}: the repo has no files at its top level")

    def _open_from_hub(self) -> None:
        info = HfApi().model_info(
            self.repo_id, revision=self.requested_revision, files_metadata=True
        )
        self.commit = info.sha
        for sibling in info.siblings or []:
            self._sizes[sibling.rfilename] = sibling.size or 0
            if sibling.lfs is not None:
                self._digests[sibling.rfilename] = f"sha256:{sibling.lfs.sha256}"

    def _open_from_cache(self) -> None:
        folder = Path(
            snapshot_download(self.repo_id, revision=self.requested_revision, local_files_only=True)
        )
        self.commit = folder.name  # snapshots/<commit>
        for path in folder.rglob("*"):  # files are symlinks to blobs, folders real ones
            if path.is_file():
                name = path.relative_to(folder).as_posix()
                self._sizes[name] = path.stat().st_size
                blob = Path(os.path.realpath(path)).name
                if len(blob) == 64:  # LFS blobs are named by their sha256
                    self._digests[name] = f"sha256:{blob}"

    # -- ModelSource -------------------------------------------------------------------------

    def identity(self) -> dict[str, object]:
        return {"uri": self.uri, "revision": self.commit, "repo": self.repo_id}

    def stored_digest(self, name: str) -> str:
        return self._digests.get(name, f"commit:{self.commit}")

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        view = byte_view(buffer)
        self.check_range(name, offset, len(view))
        fd = self._fds.get(name)
        if fd is None and len(view) <= RANGE_READ_LIMIT and not self._cached_path(name):
            self._range_get(name, offset, view)
            return
        fd = fd if fd is not None else self._open(name)
        pread_exactly(fd, offset, view, f"{self.uri}/{name} (cached)")

    def release(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- helpers -----------------------------------------------------------------------------

    def _cached_path(self, name: str) -> str | None:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(self.repo_id, name, revision=self.commit)
        return path if isinstance(path, str) else None

    def _open(self, name: str) -> int:
        """Download the file into the Hub cache once (one thread per file) and open it."""
        with self._locks_guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            fd = self._fds.get(name)
            if fd is not None:
                return fd
            with hub_calls(f"{self.uri}/{name}"):
                path = hf_hub_download(self.repo_id, name, revision=self.commit)
            fd = os.open(path, os.O_RDONLY)
            self._fds[name] = fd
            return fd

    def _range_get(self, name: str, offset: int, view: memoryview) -> None:
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(self.repo_id, name, revision=self.commit)
        headers = {**build_hf_headers(), "Range": f"bytes={offset}-{offset + len(view) - 1}"}
        try:
            response = get_session().get(url, headers=headers, follow_redirects=True)
            response.raise_for_status()
        except Exception as exc:  # httpx errors and HTTP statuses alike
            raise SourceUnavailable(f"{self.uri}/{name}: range read failed: {exc}") from exc
        data = response.content
        if len(data) != len(view):
            raise SourceUnavailable(
                f"{self.uri}/{name}: asked for {len(view)} bytes, got {len(data)}"
            )
        view[:] = data
