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
    """A pickle checkpoint, a DoRA adapter on a convolution, a URI scheme we do not read yet..."""

    code = "unsupported_format"


class CorruptCheckpoint(FapmError):
    code = "corrupt_checkpoint"


class ArchitectureMismatch(FapmError):
    code = "architecture_mismatch"


class OutputExists(FapmError):
    code = "output_exists"


class OutputNotReplaceable(FapmError):
    """`overwrite` met something that is not a model fapm published (no fapm report there)."""

    code = "output_not_replaceable"


class InvalidOutput(FapmError):
    """An output that cannot exist (a name too long for the file system, a bare bucket)."""

    code = "invalid_output"


class InvalidLocation(FapmError):
    """A location (or a file inside one) outside what the job's tenant may read or write."""

    code = "invalid_location"


class JobCancelled(FapmError):
    code = "cancelled"


class DeviceUnavailable(FapmError, ValueError):
    """The spec names a device or kernel this machine cannot run (`device: cuda` without a GPU,
    `kernel: triton` on CPU without TRITON_INTERPRET). The spec is valid, only not here; also a
    ValueError, so the CLI reports it as a bad flag value (exit 2)."""

    code = "device_unavailable"


class SourceUnavailable(FapmError):
    """A remote store did not answer (network errors, throttling) after bounded retries."""

    code = "source_unavailable"


class AccessDenied(FapmError):
    """The remote store refused the credentials it was given."""

    code = "access_denied"
