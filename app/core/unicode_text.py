"""Text that cannot be encoded: lone UTF-16 surrogates in decoded JSON.

JSON allows `"\\ud800"`, and Python's json module decodes it to a `str` holding a lone surrogate
(U+D800..U+DFFF). Such a string is not Unicode text: it cannot be encoded as UTF-8, so every
JSON response, log line or webhook that includes it fails. The API refuses it at the door
(`lone_surrogate`, used by app/api/strict_json.py) and scrubs it from anything read back from
the store (`scrub_surrogates`, used by JobRecord), so a record written before the check existed
still reads.

Both walk the value without recursion: bodies are size-capped but may be deeply nested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# After json.loads a valid pair ("\ud83d\ude00") is one astral character, so any code point left
# in this range is a lone surrogate.
SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class LoneSurrogate:
    """Where the first lone surrogate is: a dotted path (list items by index), and whether it is
    in an object key under that path or in the string value at it."""

    path: str
    in_key: bool
    code_point: int

    def describe(self) -> str:
        where = "an object key" if self.in_key else "the string"
        return f"{where} holds a lone UTF-16 surrogate (U+{self.code_point:04X}): not valid Unicode"


def lone_surrogate(value: Any) -> LoneSurrogate | None:
    """The first string (object key or value) in a decoded JSON value that holds a lone surrogate;
    None when every string is valid Unicode."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            match = SURROGATE.search(item)
            if match:
                return LoneSurrogate(path, in_key=False, code_point=ord(match.group()))
        elif isinstance(item, dict):
            for key, child in item.items():
                key_text = str(key)
                match = SURROGATE.search(key_text)
                if match:
                    return LoneSurrogate(path, in_key=True, code_point=ord(match.group()))
                stack.append((f"{path}.{key_text}" if path else key_text, child))
        elif isinstance(item, list | tuple):
            for index, child in enumerate(item):
                stack.append((f"{path}.{index}" if path else str(index), child))
    return None


def scrub_surrogates(value: Any) -> Any:
    """A copy of a decoded JSON value with every lone surrogate (in keys and strings) replaced by
    U+FFFD; the value itself when it holds none (the common case costs one walk, no copy)."""
    if lone_surrogate(value) is None:
        return value
    return _scrubbed(value)


def _scrubbed(value: Any) -> Any:
    # Iterative copy: containers are created empty and filled as the walk reaches them.
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(root, 0, value)]
    while stack:
        parent, slot, item = stack.pop()
        if isinstance(item, str):
            parent[slot] = SURROGATE.sub(REPLACEMENT, item)
        elif isinstance(item, dict):
            copy: dict[Any, Any] = {}
            parent[slot] = copy
            for key, child in item.items():
                new_key = SURROGATE.sub(REPLACEMENT, key) if isinstance(key, str) else key
                copy[new_key] = None
                stack.append((copy, new_key, child))
        elif isinstance(item, list | tuple):
            items: list[Any] = [None] * len(item)
            parent[slot] = items
            stack.extend((items, index, child) for index, child in enumerate(item))
        else:
            parent[slot] = item
    return root[0]
