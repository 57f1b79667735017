"""The fine-tuned repo's other files, carried over beside the pruned weights.

The output is a drop-in replacement for the fine-tune, so every file and folder of its repo (the
base's for an adapter job) is copied, nested folders included: sentence-transformers' `modules.json`
and `1_Pooling/`, custom code (`modeling_*.py`), processor configs, `LICENSE`, tokenizers. Left out:

- its weights: `*.safetensors` and their index (the output has its own), and weights in other
  formats (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`, `*.h5`, `*.msgpack`, `*.gguf`, `*.onnx`, ..., their
  indexes, the `onnx/` and `openvino/` exports): they hold the model before pruning, so a loader
  that prefers them would silently load the unpruned model. The report lists them as not carried.
- its card `README.md` (ours replaces it and names the fine-tune), and an earlier fapm output's
  report and manifest (ours replace them).
- version-control and download metadata (`.git/`, `.cache/`): not part of the model; and fapm's
  own staging folders (an output being written inside the fine-tune's directory).
- a name that is not a safe relative path (`..`, absolute, empty segments, a segment over 255
  bytes, both a file and a folder): listed as not carried, never written.
- files over `MAX_FILE_BYTES`, and those that would take the total over `MAX_TOTAL_BYTES` or the
  count over `MAX_FILES`: listed as not carried (the output is still a model; the report says
  what is missing).
- in a repo of more than 50,000 files and folders (`MAX_LISTED_FILES`, worker/io/source.py),
  whatever lies past them: the listing stops there (lazily: a prefix of a million objects is
  neither listed whole nor held in memory), and one not-carried entry (`*`) says so.

Files are read through the source, never by path, so a service job's reads stay confined to the
tenant's roots (worker/io/source.py): a symlink out of them fails the job with `invalid_location`.
Each file is streamed in chunks; none is held whole in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from worker.errors import JobCancelled
from worker.io.source import ModelSource, TooManyFiles
from worker.io.staging import STAGING_MARK

MAX_FILE_BYTES = 2 * 2**30
MAX_TOTAL_BYTES = 8 * 2**30
MAX_FILES = 10_000
# The not-carried entry of a listing that stopped at MAX_LISTED_FILES (no file has this name).
LISTING_STOPPED = "*"
_CHUNK = 16 * 2**20

# Suffixes of model weights (any format, any folder). Matched on whole suffixes only, so
# `onnx_config.json` or `binary_labels.txt` are carried.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".onnx_data",
    ".ot",
    ".tflite",
)
_INDEX_SUFFIX = ".index.json"
# Top-level folders of exported weights (each export holds the unpruned model).
WEIGHT_FOLDERS = ("onnx", "openvino")
# Top-level folders that are not part of the model.
METADATA_FOLDERS = (".git", ".cache")
# Written by fapm itself; the fine-tune's versions are replaced, not carried.
REPLACED_FILES = ("README.md", "pruning_report.json", "fapm-manifest.json")


@dataclass
class CarryOver:
    """What was carried (names as in the source) and what was not, with why."""

    carried: list[str] = field(default_factory=list)
    not_carried: list[dict[str, str]] = field(default_factory=list)
    bytes: int = 0

    def skip(self, name: str, reason: str) -> None:
        self.not_carried.append({"name": name, "reason": reason})


def weight_file(name: str) -> bool:
    """Whether `name` (a relative path) holds model weights or a weights index."""
    parts = PurePosixPath(name).parts
    if len(parts) > 1 and parts[0] in WEIGHT_FOLDERS:
        return True
    base = name[: -len(_INDEX_SUFFIX)] if name.endswith(_INDEX_SUFFIX) else name
    return base.endswith(WEIGHT_SUFFIXES)


def unsafe_name(name: str) -> str | None:
    """Why `name` cannot be written as a path under the output directory, or None if it can."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return "not a relative file name"
    segments = name.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return "an empty, '.' or '..' path segment"
    if any(len(segment.encode("utf-8", "surrogatepass")) > 255 for segment in segments):
        return "a path segment over 255 bytes"
    return None


def _exclusion(name: str) -> str | None:
    """Why `name` is left out whatever its size, or None."""
    if weight_file(name):
        return "weights (the output holds the pruned ones)"
    if name in REPLACED_FILES:
        return "replaced by the one fapm writes"
    parts = PurePosixPath(name).parts
    if parts[0] in METADATA_FOLDERS:
        return "version-control or download metadata"
    if any(STAGING_MARK in part for part in parts[:-1]):
        return "a fapm staging folder (an output being written)"
    return unsafe_name(name)


def carry_over(
    source: ModelSource,
    directory: Path,
    transforms: dict[str, Callable[[bytes], bytes]] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> CarryOver:
    """Copy the source's files (see the module docstring) into `directory`, byte for byte.

    `transforms` maps a top-level name to a function of its (small, already validated) bytes,
    for files fapm rewrites (config.json's dtype). Raises what the source raises for a file that
    cannot be read (InvalidLocation for a symlink out of the job's roots) and JobCancelled.
    """
    transforms = transforms or {}
    cancelled = should_cancel or (lambda: False)
    result = CarryOver()
    names = []
    try:
        for name in source.iter_files():
            names.append(name)
    except TooManyFiles as exc:
        result.skip(LISTING_STOPPED, f"{exc}: the files past it are not carried")
    names.sort()
    folders = {str(parent) for name in names for parent in PurePosixPath(name).parents}
    for name in names:
        reason = _exclusion(name)
        if reason is None and name in folders:
            reason = "both a file and a folder in the source"
        if reason is not None:
            result.skip(name, reason)
            continue
        size = source.size(name)
        if size > MAX_FILE_BYTES:
            reason = f"{size} bytes, over the {MAX_FILE_BYTES}-byte limit for one file"
        elif result.bytes + size > MAX_TOTAL_BYTES:
            reason = f"would take the files carried over the {MAX_TOTAL_BYTES}-byte total limit"
        elif len(result.carried) >= MAX_FILES:
            reason = f"over the limit of {MAX_FILES} files carried"
        if reason is not None:
            result.skip(name, reason)
            source.release(name)
            continue
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if name in transforms:
                target.write_bytes(transforms[name](source.read_file(name)))
            else:
                _stream_copy(source, name, size, target, cancelled)
        finally:
            source.release(name)
        result.carried.append(name)
        result.bytes += size
    return result


def _stream_copy(
    source: ModelSource, name: str, size: int, target: Path, cancelled: Callable[[], bool]
) -> None:
    buffer = memoryview(bytearray(min(size, _CHUNK)))
    with open(target, "wb") as out:
        offset = 0
        while offset < size:
            if cancelled():
                raise JobCancelled("the job was cancelled")
            view = buffer[: min(_CHUNK, size - offset)]
            source.read_into(name, offset, view)
            out.write(view)
            offset += len(view)
