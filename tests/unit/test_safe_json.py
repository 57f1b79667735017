"""The safe JSON loader: each limit refuses with the caller's typed error before anything is built,
and what passes parses exactly as json.loads would."""

from __future__ import annotations

import json
import resource
import time

import pytest

from worker.errors import CorruptCheckpoint
from worker.io.safe_json import JsonLimits, _deepest, load_json, measure

LIMITS = JsonLimits(max_bytes=10_000, max_depth=4, max_values=100, max_digits=20)


def load(raw: bytes, limits: JsonLimits = LIMITS, expect: type | tuple = dict) -> object:
    return load_json(raw, "f.json", limits, CorruptCheckpoint, expect=expect)


@pytest.mark.parametrize(
    "doc",
    [
        {"a": [1, 2, {"b": "x"}]},
        {"s": 'quote " and backslash \\ and brackets [[[{{{ in a string', "n": -1.5e3},
        {"unicode": "é😀\u2028", "empty": {}, "list": []},
        {"digits": 10**19, "nested": [[[]]]},
    ],
)
def test_valid_documents_parse_as_json_loads_does(doc):
    raw = json.dumps(doc).encode()
    assert load(raw) == json.loads(raw)
    raw_unescaped = json.dumps(doc, ensure_ascii=False).encode()
    assert load(raw_unescaped) == doc


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 5 + b"]" * 5, "nested deeper than 4"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "bytes of JSON, over"),
        (b'{"a":' * 30 + b"1" + b"}" * 30, "nested deeper than 4"),
        (b"[" * 60, "nested deeper than 4"),  # truncated: never closed
        (b'{"a": ' + b"9" * 5000 + b"}", "more than 20 digits"),
        (b'{"a": [' + b"0," * 200 + b"0]}", "JSON values, over the limit of 100"),
        (b"[" + b'"",' * 200 + b'""]', "JSON values, over the limit of 100"),
        (b'{"a": "\\ud800"}', "lone UTF-16 surrogate"),
        (b'{"\\udc00": 1}', "lone UTF-16 surrogate"),
        (b'{"a": "\xed\xa0\x80"}', "not UTF-8"),  # a surrogate encoded in UTF-8
        (b'{"a": "\xff"}', "not UTF-8"),
        (b'{"a": 1', "not valid JSON"),
        (b"[1, 2]", "not a JSON object (it is an array)"),
        (b'"text"', "not a JSON object (it is a string)"),
        (b"", "not valid JSON"),
    ],
)
def test_each_limit_and_malformation_is_a_typed_error(raw, message):
    with pytest.raises(CorruptCheckpoint, match=r"f\.json") as info:
        load(raw)
    assert message in str(info.value)


def test_escaped_quotes_and_backslashes_do_not_hide_brackets():
    # A string ending in an escaped backslash, then real nesting: the nesting must be seen.
    deep = b'["\\\\", ' + b"[" * 5 + b"]" * 5 + b"]"
    with pytest.raises(CorruptCheckpoint, match="nested deeper"):
        load(deep)
    # Brackets inside a string with escaped quotes are not nesting.
    shallow = b'{"a": "\\"[[[[[[[[\\""}'
    assert load(shallow) == {"a": '"[[[[[[[["'}


def test_an_escaped_surrogate_pair_is_valid_and_a_literal_backslash_u_is_not_an_escape():
    assert load(b'{"a": "\\ud83d\\ude00"}') == {"a": "😀"}
    assert load(b'{"a": "\\\\ud800"}') == {"a": "\\ud800"}


def test_expect_accepts_several_types():
    assert load(b"[1]", expect=(dict, list)) == [1]
    with pytest.raises(CorruptCheckpoint, match="array or object"):
        load(b"1", expect=(dict, list))


def test_depth_is_exact_for_balanced_brackets_and_an_upper_bound_otherwise():
    def parser_depth(brackets: bytes) -> int:  # what a recursive parser reaches
        depth = deepest = 0
        for byte in brackets:
            depth += 1 if byte == ord("[") else -1
            if depth < 0:
                break
            deepest = max(deepest, depth)
        return deepest

    import random

    rng = random.Random(7)
    for _ in range(5000):
        brackets = bytes(rng.choice(b"[]") for _ in range(rng.randint(0, 40)))
        assert _deepest(brackets, 100) >= parser_depth(brackets), brackets
    for depth in range(12):
        balanced = b"[]" * 3 + b"[" * depth + b"][]" * 2 + b"]" * depth
        assert _deepest(balanced, 100) == max(parser_depth(balanced), 1)


def test_a_huge_document_of_tiny_values_is_refused_fast_and_small():
    """Measured before parsing: a 60 MB array of 20M zeros is refused without building it."""
    raw = b"[" + b"0," * 20_000_000 + b"0]"
    limits = JsonLimits(max_bytes=100_000_000, max_values=1_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(CorruptCheckpoint, match="JSON values, over the limit"):
        measure(raw, "big.json", limits, CorruptCheckpoint)
    assert time.perf_counter() - started < 5
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 150 * 1024  # json.loads would build a 160 MB list of 20M ints
