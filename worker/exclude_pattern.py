"""The `exclude` pattern: a regular expression on tensor names, run by RE2 (google-re2).

Python's `re` backtracks, so a pattern such as `(.|.)*x$` takes exponential time on a long tensor
name and pins a worker; RE2 matches in time linear in the name, whatever the pattern. Its syntax
is Python's for everything a name filter needs (alternation, classes, groups, anchors, `(?i)`);
what needs backtracking (backreferences, lookaround) does not compile, and a job that uses it is
refused at submission. Matching is `search`: anywhere in the name, as with `re.search`.

This module imports no torch (the API validates `exclude` through JobSpec).
"""

from __future__ import annotations

import re2

# Longer than any useful name filter; RE2's own memory cap (max_mem) bounds what compiles too.
MAX_EXCLUDE_CHARS = 1000

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the error comes back as an exception; no line on stderr


class ExcludePattern:
    """A compiled `exclude` pattern. Raises ValueError, with a message for people, for a pattern
    that is too long, not valid Unicode, or not one RE2 can run in linear time."""

    def __init__(self, pattern: str) -> None:
        if len(pattern) > MAX_EXCLUDE_CHARS:
            raise ValueError(f"at most {MAX_EXCLUDE_CHARS} characters (got {len(pattern)})")
        try:
            self._regexp = re2.compile(pattern, _OPTIONS)
        except UnicodeEncodeError:
            raise ValueError("not valid Unicode (a lone surrogate)") from None
        except re2.error as exc:
            reason = exc.args[0] if exc.args else exc
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            raise ValueError(
                f"not a valid RE2 regular expression: {reason} (RE2 runs in linear time, so "
                "backreferences and lookaround are not supported)"
            ) from None
        self.pattern = pattern

    def matches(self, name: str) -> bool:
        """Whether the pattern matches anywhere in `name` (as `re.search` would)."""
        try:
            return self._regexp.search(name) is not None
        except UnicodeEncodeError:
            # A header may name a tensor with a lone surrogate (JSON allows "\ud800"); RE2
            # takes UTF-8, so such a code point is matched as U+FFFD.
            fixed = name.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            return self._regexp.search(fixed) is not None
