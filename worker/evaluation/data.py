"""Evaluation sets: JSONL files at any location a model can come from.

A set's URI names one file: `/abs/task.jsonl`, `file:///abs/task.jsonl`,
`s3://bucket/prefix/task.jsonl` or `hf://org/name[@revision]/task.jsonl` (a file at the top level
of a Hub repo). The file is read whole through the `ModelSource` of the directory that holds it,
so credentials, endpoints, retries and the Hub cache work exactly as for checkpoints.

Lines end at "\n" (a "\r" before it, a UTF-8 BOM at the start and blank lines are ignored), and
are numbered from 1 as an editor shows them; with `max_examples`, lines after the first N examples
are not read at all. JSON strings may hold U+2028, U+0085 and the like raw (JSON allows it, and
`json.dumps(ensure_ascii=False)` writes them): they do not end a line. Each line is
  task:    {"prompt": str, "completion": str}  (completion not empty)
  general: {"text": str}
Anything else fails the job with `bad_eval_data` naming the file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.errors import SourceNotFound
from worker.evaluation.errors import EmptyEvalSet, EvalDataError
from worker.io.location_names import check_file_name
from worker.io.safe_json import JsonLimits, load_json
from worker.io.source import ModelSource
from worker.io.uri import open_source, parse_uri

# Evaluation sets are read into memory whole; a larger file is almost surely the wrong file.
MAX_FILE_BYTES = 256 * 2**20
# One line is one example: a few strings, perhaps some metadata beside them.
LINE_LIMITS = JsonLimits(max_bytes=MAX_FILE_BYTES, max_depth=32, max_values=2**16)


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    completion: str
    line: int  # 1-based line in the file, for error messages


@dataclass(frozen=True)
class GeneralText:
    text: str
    line: int


def split_file_uri(uri: str) -> tuple[str, str]:
    """(the containing directory as a model location, the file name). Raises ValueError for a
    malformed URI or one that names a directory."""
    if uri.lower().startswith("hf://"):
        # hf://org/name[@rev]/file: the repo is everything before the file name.
        head, _, name = uri.rpartition("/")
        if not name or head.count("/") != 3:
            raise ValueError(f"{uri}: a Hub file is hf://org/name[@revision]/file.jsonl")
        parse_uri(head)
        try:
            check_file_name(name)
        except ValueError as exc:
            raise ValueError(f"{uri}: {exc}") from None
        return head, name
    parsed = parse_uri(uri)  # raises ValueError on unknown schemes
    if parsed.scheme == "file":
        path = parsed.local_path
        if not path.name or uri.endswith("/"):
            raise ValueError(f"{uri}: name a file (e.g. /data/task.jsonl), not a directory")
        return str(path.parent), path.name
    head, _, name = uri.rpartition("/")
    if not name:
        raise ValueError(f"{uri}: name a file (e.g. .../task.jsonl), not a directory")
    if not head.removeprefix("s3://"):
        raise ValueError(f"{uri}: an S3 file is s3://bucket/prefix/file.jsonl")
    return head + "/", name


def read_file(uri: str) -> bytes:
    """The bytes of the file at `uri`, through the source of its directory."""
    directory, name = split_file_uri(uri)
    source: ModelSource = open_source(directory)
    try:
        if not source.exists(name):
            raise SourceNotFound(f"{uri}: no such file")
        size = source.size(name)
        if size > MAX_FILE_BYTES:
            raise EvalDataError(
                f"{uri}: {size} bytes; evaluation sets are read whole (at most "
                f"{MAX_FILE_BYTES // 2**20} MiB): use max_examples on a smaller file"
            )
        return source.read_file(name)
    finally:
        source.close()


def _lines(uri: str, data: bytes, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, object) of the first `limit` non-blank lines (all when None)."""
    rows: list[tuple[int, dict]] = []
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if limit is not None and len(rows) >= limit:
            break
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise EvalDataError(f"{uri} line {number}: not UTF-8") from None
        if not line.strip():
            continue
        row = load_json(raw, f"{uri} line {number}", LINE_LIMITS, EvalDataError, expect=dict)
        assert isinstance(row, dict)
        rows.append((number, row))
    if not rows:
        raise EmptyEvalSet(f"{uri}: no examples (the file is empty)")
    return rows


def _string_field(uri: str, number: int, row: dict, key: str, allow_empty: bool) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise EvalDataError(f'{uri} line {number}: "{key}" must be a string')
    if not allow_empty and not value.strip():
        raise EvalDataError(f'{uri} line {number}: "{key}" is empty')
    return value


def parse_task(uri: str, data: bytes, max_examples: int | None = None) -> list[TaskExample]:
    """Task examples from JSONL bytes (the first `max_examples` when given)."""
    examples = []
    for number, row in _lines(uri, data, max_examples):
        prompt = _string_field(uri, number, row, "prompt", allow_empty=True)
        completion = _string_field(uri, number, row, "completion", allow_empty=False)
        examples.append(TaskExample(prompt, completion, number))
    return examples


def parse_general(uri: str, data: bytes, max_examples: int | None = None) -> list[GeneralText]:
    """General texts from JSONL bytes (the first `max_examples` when given)."""
    return [
        GeneralText(_string_field(uri, number, row, "text", allow_empty=False), number)
        for number, row in _lines(uri, data, max_examples)
    ]


def load_task(uri: str, max_examples: int | None = None) -> list[TaskExample]:
    return parse_task(uri, read_file(uri), max_examples)


def load_general(uri: str, max_examples: int | None = None) -> list[GeneralText]:
    return parse_general(uri, read_file(uri), max_examples)
