"""Errors with a stable code (for job records and API responses) and a message a user can act on."""

from __future__ import annotations


class FapmError(Exception):
    """Base class: `code` is stable and machine-readable, the message is for people."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])


class SourceNotFound(FapmError):
    code = "source_not_found"


class UnsupportedFormat(FapmError):
    """A pickle checkpoint, a DoRA adapter, a URI scheme we do not read yet, ..."""

    code = "unsupported_format"


class CorruptCheckpoint(FapmError):
    code = "corrupt_checkpoint"


class ArchitectureMismatch(FapmError):
    code = "architecture_mismatch"


class OutputExists(FapmError):
    code = "output_exists"


class JobCancelled(FapmError):
    code = "cancelled"


class SourceUnavailable(FapmError):
    """A remote store did not answer (network errors, throttling) after bounded retries."""

    code = "source_unavailable"


class AccessDenied(FapmError):
    """The remote store refused the credentials it was given."""

    code = "access_denied"
