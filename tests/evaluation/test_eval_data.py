"""Evaluation sets: lines end at "\\n" only (JSON strings may hold U+2028 and the like raw),
CRLF and a BOM are accepted, and with max_examples the lines after the first N are not read."""

from __future__ import annotations

import json

import pytest

from worker.evaluation.data import parse_general, parse_task
from worker.evaluation.errors import EvalDataError


def test_unicode_line_separators_inside_strings_do_not_split_a_line():
    text = "first\u2028second\x85third\u2029end"
    data = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode()
    data += (json.dumps({"text": "b"}) + "\n").encode()
    assert [(t.text, t.line) for t in parse_general("g.jsonl", data)] == [(text, 1), ("b", 2)]


def test_crlf_lines_and_a_bom_are_accepted():
    data = b'\xef\xbb\xbf{"prompt": "p", "completion": " c"}\r\n\r\n{"prompt": "q", "completion": " d"}\r\n'
    examples = parse_task("t.jsonl", data)
    assert [(e.prompt, e.completion, e.line) for e in examples] == [("p", " c", 1), ("q", " d", 3)]


def test_lines_after_max_examples_are_not_read():
    good = b'{"prompt": "p", "completion": " c"}\n\n{"prompt": "q", "completion": " d"}\n'
    for tail in (b"{not json\n", b'{"prompt": "\xff"}\n', b'{"prompt": 1}\n'):
        assert [e.line for e in parse_task("t.jsonl", good + tail, max_examples=2)] == [1, 3]
        with pytest.raises(EvalDataError, match=r"t.jsonl line 4"):
            parse_task("t.jsonl", good + tail)
