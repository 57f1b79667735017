"""Rules that turn a Hugging Face Hub push into a pruning job (FAPM_HF_WEBHOOK_RULES_FILE).

The file is YAML or JSON: a list of rules (or `{rules: [...]}`), first match wins:

    - repo: "acme/llama-*-sft"          # glob on org/name (fnmatch, case-sensitive)
      tenant: acme                      # whose job it is (quota, listing)
      base: hf://meta-llama/Llama-3.1-8B@main
      method: fapm
      sparsity: 0.9
      output: s3://acme-pruned/{name}/{sha}/
      revision: main                    # branch whose pushes count (default main)
      role: finetuned                   # or adapter: the pushed repo is a LoRA adapter
      labels: {team: nlp}               # optional; any other JobSpec field too (scope, dtype...)

`output` and label values are templates with `{repo}` (org/name), `{name}`, `{sha}`,
`{short_sha}` and `{revision}`. Each rule is checked when the file is loaded, by building its job
for a placeholder repo, so a typo shows up as an error naming the rule, not as a failed job.
The file is re-read when its mtime changes, and a broken edit keeps nothing half-loaded: the
webhook answers 503 naming the error until the file is fixed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.jobs.records import JobRequest
from worker.io.uri import parse_uri

PLACEHOLDERS = ("repo", "name", "sha", "short_sha", "revision")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class HubRulesError(ValueError):
    """The rules file cannot be used (unreadable, not YAML/JSON, or a rule is invalid)."""


def fill_template(template: str, values: dict[str, str]) -> str:
    """Substitute `{placeholder}`s. Only the names in PLACEHOLDERS exist (no attribute or index
    access, unlike str.format)."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise ValueError(f"unknown placeholder {{{name}}}; use {', '.join(PLACEHOLDERS)}")
        return values[name]

    return _PLACEHOLDER.sub(substitute, template)


class HubRule(BaseModel):
    """One rule; fields beyond those below are JobSpec fields passed to the job."""

    model_config = ConfigDict(extra="allow")

    repo: str = Field(description="Glob on the Hub repo id (org/name).")
    tenant: str = Field(min_length=1)
    output: str = Field(description="Output URI template.")
    revision: str = Field(default="main", description="Branch whose updates start a job.")
    # The pushed repo is the fine-tune (task vector), the adapter, or the model whose weights
    # are pruned (prune "weights").
    role: Literal["finetuned", "adapter", "model"] = "finetuned"
    labels: dict[str, str] = Field(default_factory=dict)

    def matches(self, repo: str) -> bool:
        return fnmatch.fnmatchcase(repo, self.repo)

    def job_request(self, repo: str, sha: str) -> JobRequest:
        """The job for a push of `sha` to `repo` (ValueError/ValidationError if invalid)."""
        values = {
            "repo": repo,
            "name": repo.split("/", 1)[-1],
            "sha": sha,
            "short_sha": sha[:12],
            "revision": self.revision,
        }
        fields: dict[str, Any] = dict(self.model_extra or {})
        for taken in ("finetuned", "adapter", "model"):
            if taken in fields:
                raise ValueError(f"{taken}: set by the pushed repo; use `role` instead")
        fields[self.role] = f"hf://{repo}@{sha}"
        fields["output"] = fill_template(self.output, values)
        fields["labels"] = {
            "source": "huggingface",
            "hf_repo": repo,
            "hf_sha": sha,
            **{k: fill_template(v, values) for k, v in self.labels.items()},
        }
        return JobRequest.model_validate(fields)


def parse_rules(text: str, where: str) -> list[HubRule]:
    """Parse and check a rules document (YAML is a superset of JSON, but JSON errors read
    better from the JSON parser, so `.json` files use it)."""
    try:
        data = json.loads(text) if where.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise HubRulesError(f"{where}: not valid YAML/JSON: {exc}") from exc
    if isinstance(data, dict) and "rules" in data:
        data = data["rules"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise HubRulesError(f"{where}: expected a list of rules")
    rules = []
    for number, item in enumerate(data, start=1):
        try:
            rule = HubRule.model_validate(item)
            request = rule.job_request("org/name", "0" * 40)  # bad fields and templates now
            for location in (request.base, request.output):
                if location is not None:  # prune "weights" has no base
                    parse_uri(location)  # bucket, repo and revision names by their services' rules
        except (ValidationError, ValueError) as exc:
            raise HubRulesError(f"{where}: rule {number}: {exc}") from exc
        rules.append(rule)
    return rules


class HubRulesFile:
    """The rules of one file, re-parsed when its mtime changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime: tuple[int, int] | None = None
        self._rules: list[HubRule] = []
        self._error: HubRulesError | None = None

    def rules(self) -> list[HubRule]:
        """The current rules; HubRulesError if the file is missing or invalid."""
        try:
            stat = os.stat(self.path)
            mtime = (stat.st_mtime_ns, stat.st_size)
        except OSError as exc:
            raise HubRulesError(f"{self.path}: {exc.strerror}") from exc
        if mtime != self._mtime:
            with self._lock:
                if mtime != self._mtime:
                    try:
                        self._rules, self._error = (
                            parse_rules(self.path.read_text(), str(self.path)),
                            None,
                        )
                    except HubRulesError as exc:
                        self._rules, self._error = [], exc
                    except OSError as exc:
                        self._rules = []
                        self._error = HubRulesError(f"{self.path}: {exc.strerror}")
                    self._mtime = mtime
        if self._error is not None:
            raise self._error
        return self._rules

    def match(self, repo: str) -> HubRule | None:
        return next((rule for rule in self.rules() if rule.matches(repo)), None)
