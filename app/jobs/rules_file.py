"""What the webhook rules files (hub_rules.py, mlflow_rules.py) share.

Each is YAML or JSON, a list of rules (or `{rules: [...]}`), every rule checked when the file is
loaded by building its job for a placeholder source, and re-read when its mtime or size changes.
The rule models and what a job is made of stay in their own modules.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from app.jobs.records import JobRequest
from worker.io.uri import parse_uri

Rule = TypeVar("Rule", bound=BaseModel)
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def fill_placeholders(template: str, values: dict[str, str]) -> str:
    """Substitute `{placeholder}`s. Only the keys of `values` exist (no attribute or index
    access, unlike str.format)."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise ValueError(f"unknown placeholder {{{name}}}; use {', '.join(values)}")
        return values[name]

    return _PLACEHOLDER.sub(substitute, template)


def parse_rules(
    text: str,
    where: str,
    rule_type: type[Rule],
    placeholder_job: Callable[[Rule], JobRequest],
    error: type[ValueError],
) -> list[Rule]:
    """Parse and check a rules document; `error` names the file (and the rule) at fault.

    `placeholder_job` builds a rule's job for a made-up source, so that bad fields and templates
    fail here rather than as a failed job. YAML is a superset of JSON, but JSON errors read
    better from the JSON parser, so `.json` files use it.
    """
    try:
        data: Any = json.loads(text) if where.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise error(f"{where}: not valid YAML/JSON: {exc}") from exc
    if isinstance(data, dict) and "rules" in data:
        data = data["rules"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise error(f"{where}: expected a list of rules")
    rules = []
    for number, item in enumerate(data, start=1):
        try:
            rule = rule_type.model_validate(item)
            request = placeholder_job(rule)
            for location in (request.base, request.output):
                if location is not None:  # prune "weights" has no base
                    parse_uri(location)  # bucket, repo and revision names by their services' rules
        except ValidationError as exc:
            raise error(f"{where}: rule {number}: {_without_input(exc)}") from None
        except ValueError as exc:
            raise error(f"{where}: rule {number}: {exc}") from exc
        rules.append(rule)
    return rules


def _without_input(exc: ValidationError) -> str:
    """Each refused field and why, never its value: a rule may hold a webhook URL's token or a
    secret, and this message reaches logs and the webhook's 503 answer."""
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or 'rule'}: {item['msg']}"
        for item in exc.errors(include_input=False, include_url=False)
    )


class RulesFile(Generic[Rule]):
    """The rules of one file, re-parsed when its mtime or size changes. A broken edit keeps
    nothing half-loaded: `rules()` raises the file's error until it is fixed."""

    def __init__(
        self, path: Path, parse: Callable[[str, str], list[Rule]], error: type[ValueError]
    ) -> None:
        self.path = path
        self._parse = parse
        self._error_type = error
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._rules: list[Rule] = []
        self._error: ValueError | None = None

    def rules(self) -> list[Rule]:
        """The current rules; the error type given if the file is missing or invalid."""
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            raise self._error_type(f"{self.path}: {exc.strerror}") from exc
        stamp = (stat.st_mtime_ns, stat.st_size)
        # Checked and read under one lock: a request never sees the rules of one version of the
        # file with the error of another.
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._rules, self._error = (
                        self._parse(self.path.read_text(), str(self.path)),
                        None,
                    )
                except self._error_type as exc:
                    self._rules, self._error = [], exc
                except OSError as exc:
                    self._rules, self._error = [], self._error_type(f"{self.path}: {exc.strerror}")
                self._stamp = stamp
            if self._error is not None:
                raise self._error
            return self._rules
