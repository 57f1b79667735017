"""Values shared by the spec's sections: byte sizes, sparsity, non-blank strings."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_byte_size(value: int | str) -> int:
    """Parse a byte count: an int, or a string with an optional unit (`500MB`, `5GB`, `1GiB`).

    Units are decimal (KB, MB, GB, TB) or binary (KiB, MiB, GiB, TiB), as the Hugging Face tooling
    accepts them. Raises ValueError for anything else or a size below one byte.
    """
    if isinstance(value, bool):
        raise ValueError("a byte size must be a number or a string like '5GB'")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(str(value))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ValueError(
                f"cannot parse byte size {value!r}: use e.g. 5GB, 500MB, 1GiB or bytes"
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise ValueError("a byte size must be at least 1 byte")
    return size


ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]


def parse_sparsity(value: object) -> float | str:
    """A number in [0, 1], or "auto". One validator (not a pydantic union) so an error names
    the field `sparsity` alone, as every other field's does."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool):
        raise ValueError('must be a number in [0, 1] or "auto"')
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError('must be a number in [0, 1] or "auto"') from None
    if not 0.0 <= number <= 1.0:
        raise ValueError("must be in [0, 1] (0.9 drops 90% of each tensor's update)")
    return number


Sparsity = Annotated[
    float | Literal["auto"],
    BeforeValidator(parse_sparsity),
    Field(json_schema_extra={"minimum": 0.0, "maximum": 1.0}),
]


# `_not_blank` for the JSON schema: at least one character that str.strip() keeps (Python's
# whitespace: JSON Schema's `\S` would let "\x1f" through).
NOT_BLANK = r"[^\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def not_blank(value: str) -> str:
    """A field validator's body: a string with at least one non-whitespace character."""
    if not value.strip():
        raise ValueError("must not be empty")
    return value
