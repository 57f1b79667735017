"""JSON from untrusted bytes (headers, index and config files, evaluation lines), parsed safely.

`json.loads` recurses once per nesting level (deep nesting is a RecursionError), turns a digit
string of any length into an int (Python refuses more than 4,300 digits with a ValueError, and
below that the work grows quadratically), accepts `\\ud800` escapes that give strings no UTF-8
encoder can write, and builds every object before anyone can count them. So before parsing, the
bytes are measured without recursion and in bounded memory, at the speed of `bytes` methods:
escaped quotes are dropped so that quotes count the strings, strings are cut out piece by piece,
what is left is counted (commas, brackets, braces) and the nesting depth is found from the runs
of brackets. Anything over a limit, or not JSON, or not the type the
caller expects, raises the caller's `FapmError` subclass with a message naming the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from worker.errors import FapmError

# A JSON string once its escaped quotes are gone.
_STRING = re.compile(rb'"[^"]*"')
# Bytes of a document handled at a time while strings are cut out of it.
_CHUNK = 2**18
# What is left of the structure once strings are gone: only brackets, with braces as brackets.
_BRACKETS_ONLY = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# An escaped UTF-16 surrogate (\uD800-\uDFFF): legal JSON, but alone it is not Unicode.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


@dataclass(frozen=True)
class JsonLimits:
    """What one document may hold. `max_values` bounds the strings plus the members of all
    arrays and objects (what parsing allocates), `max_digits` the length of one number's digit run."""

    max_bytes: int
    max_depth: int = 32
    max_values: int = 1_000_000
    max_digits: int = 100
    note: str = ""  # appended to the messages about size (what the limits mean for this file)


@dataclass(frozen=True)
class JsonShape:
    """A document's size, measured before it is parsed."""

    depth: int  # deepest nesting of arrays and objects (a flat object is 1)
    values: int  # strings, plus an upper bound on the members of all arrays and objects
    objects: int  # how many objects ({...}) it holds


def measure(raw: bytes, where: str, limits: JsonLimits, error: type[FapmError]) -> JsonShape:
    """Check `raw` against `limits` without parsing it; raises `error` naming the first limit
    it exceeds. A document that is not valid JSON may pass (parsing then says what is wrong)."""
    check_size(len(raw), where, limits, error)
    # Escaped backslashes, then escaped quotes, removed: every quote left opens or closes a
    # string, so counting quotes counts strings (cheaply, before anything else).
    delimited = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    strings = delimited.count(b'"') // 2
    if strings > limits.max_values:
        _too_many(strings, where, limits, error)
    values, objects, brackets = strings, 0, bytearray()
    for structure in _outside_strings(delimited):
        if re.search(rb"\d{%d}" % (limits.max_digits + 1), structure):
            raise error(f"{where}: a number with more than {limits.max_digits} digits")
        objects += structure.count(b"{")
        values += structure.count(b",") + structure.count(b"[") + structure.count(b"{")
        if values > limits.max_values:  # checked per piece: `brackets` stays that small
            _too_many(values, where, limits, error)
        brackets += structure.translate(_BRACKETS_ONLY, _NOT_BRACKETS)
    depth = _deepest(bytes(brackets), limits.max_depth)
    if depth > limits.max_depth:
        raise error(f"{where}: JSON nested deeper than {limits.max_depth} levels")
    return JsonShape(depth=depth, values=values, objects=objects)


def check_size(size: int, where: str, limits: JsonLimits, error: type[FapmError]) -> None:
    """Refuse a document of `size` bytes over the limit (call it before reading a file)."""
    if size > limits.max_bytes:
        raise error(
            f"{where}: {size:,} bytes of JSON, over the {limits.max_bytes:,}-byte limit"
            + limits.note
        )


def _outside_strings(delimited: bytes) -> Iterator[bytes]:
    """What lies outside strings, in pieces of about _CHUNK bytes (each cut where a string
    opens), so removing the strings never holds more than one piece's matches."""
    start = 0
    while start < len(delimited):
        end = delimited.find(b'"', start + _CHUNK)
        if end >= 0 and delimited.count(b'"', start, end) % 2:  # it closes a string
            end = delimited.find(b'"', end + 1)
        if end < 0:
            end = len(delimited)
        yield _STRING.sub(b"", delimited[start:end])
        start = end


def _too_many(values: int, where: str, limits: JsonLimits, error: type[FapmError]) -> None:
    raise error(
        f"{where}: about {values:,} JSON values, over the limit of {limits.max_values:,}"
        + limits.note
    )


def _deepest(brackets: bytes, cap: int) -> int:
    """How deep a parser nests reading `brackets` (only "[" and "]"): exact when they balance,
    else an upper bound; stops counting past `cap`. Each pass removes every innermost pair,
    which lowers every peak by one level, so balanced brackets vanish in `depth` passes and what
    is left of others is "]]]...[[[" (the "[" opened and never closed)."""
    passes = 0
    while passes <= cap:
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            break
        brackets, passes = shorter, passes + 1
    return passes + brackets.count(b"[")


def parse(
    raw: bytes,
    where: str,
    error: type[FapmError],
    expect: type | tuple[type, ...] = dict,
) -> object:
    """Parse `raw` (already `measure`d) as UTF-8 JSON whose top level is an `expect`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 (invalid byte at offset {exc.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"{where}: not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:  # measure() was skipped or its limits are off
        raise error(f"{where}: not valid JSON ({exc})") from None
    if _SURROGATE_ESCAPE.search(raw) and not _all_strings_encodable(value):
        raise error(f"{where}: a string holds a lone UTF-16 surrogate (not valid Unicode)")
    if not isinstance(value, expect):
        raise error(f"{where}: not a JSON {_type_name(expect)} (it is {_json_type(value)})")
    return value


def load_json(
    raw: bytes,
    where: str,
    limits: JsonLimits,
    error: type[FapmError],
    expect: type | tuple[type, ...] = dict,
) -> object:
    """`measure` then `parse`: the one way worker code reads JSON it did not write."""
    measure(raw, where, limits, error)
    return parse(raw, where, error, expect)


def _all_strings_encodable(value: object) -> bool:
    """False if any string or key in `value` holds a lone surrogate (walked without recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings = [item]
        elif isinstance(item, dict):
            strings = list(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for string in strings:
            try:
                string.encode("utf-8")
            except UnicodeEncodeError:
                return False
    return True


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number"}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    name = _JSON_NAMES.get(type(value), type(value).__name__)
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _type_name(expect: type | tuple[type, ...]) -> str:
    types = expect if isinstance(expect, tuple) else (expect,)
    return " or ".join(sorted({_JSON_NAMES.get(t, t.__name__) for t in types}))
