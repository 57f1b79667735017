"""Rules that turn an MLflow Model Registry event into a pruning job (FAPM_MLFLOW_WEBHOOK_RULES_FILE).

The file is YAML or JSON: a list of rules (or `{rules: [...]}`), first match wins:

    - model: "support-*"                 # glob on the registered model name (case-sensitive)
      events: [model_version.created, model_version_tag.set]   # default: model_version.created
      tags: {fapm.prune: "true"}         # version tags that must hold these values (default none)
      tenant: acme                       # whose job it is (quota, listing, locations)
      base: s3://acme-models/llama-3.1-8b/
      method: fapm
      sparsity: 0.9
      output: mlflow://{name}            # or s3://..., a path: any output location
      mlflow: {alias: pruned}            # optional; any other JobSpec field too
      path: model                        # optional: the folder of the version's files to read
      role: finetuned                    # or adapter: the version is a LoRA adapter
      labels: {team: support}

`output` and label values are templates with `{name}` (the registered model) and `{version}`.
Each rule is checked when the file is loaded by building its job for a placeholder version, so a
typo shows up as an error naming the rule. The file is re-read when its mtime changes; a broken
edit answers 503 until it is fixed.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.jobs import rules_file
from app.jobs.records import JobRequest
from app.jobs.rules_file import RulesFile, fill_placeholders

# The registry events that can start a job (MLflow's `{entity}.{action}`); each names a version.
EVENTS = ("model_version.created", "model_version_tag.set", "model_version_alias.created")
Event = Literal["model_version.created", "model_version_tag.set", "model_version_alias.created"]


class MlflowRulesError(ValueError):
    """The rules file cannot be used (unreadable, not YAML/JSON, or a rule is invalid)."""


class MlflowRule(BaseModel):
    """One rule; fields beyond those below are JobSpec fields passed to the job."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="Glob on the registered model name.")
    tenant: str = Field(min_length=1)
    output: str = Field(description="Output URI template.")
    events: list[Event] = Field(default_factory=lambda: ["model_version.created"], min_length=1)
    tags: dict[str, str] = Field(default_factory=dict)
    path: str = Field(default="", description="Folder of the version's artifacts to read.")
    role: Literal["finetuned", "adapter"] = "finetuned"
    labels: dict[str, str] = Field(default_factory=dict)

    def matches(self, name: str, event: str) -> bool:
        return event in self.events and fnmatch.fnmatchcase(name, self.model)

    def missing_tags(self, tags: dict[str, str]) -> list[str]:
        """The rule's tags the version lacks (or holds with another value)."""
        return [f"{k}={v}" for k, v in self.tags.items() if tags.get(k) != v]

    def job_request(self, name: str, version: str, location: str) -> JobRequest:
        """The job for version `version` of `name`, whose files are at `location`."""
        values = {"name": name, "version": version}
        fields: dict[str, Any] = dict(self.model_extra or {})
        for taken in ("finetuned", "adapter"):
            if taken in fields:
                raise ValueError(f"{taken}: set by the model version; use `role` instead")
        sub = self.path.strip("/")
        if sub:
            location = f"{location.rstrip('/')}/{sub}" + ("/" if location.endswith("/") else "")
        fields[self.role] = location
        fields["output"] = fill_placeholders(self.output, values)
        fields["labels"] = {
            "source": "mlflow",
            "mlflow_model": name,
            "mlflow_version": version,
            **{k: fill_placeholders(v, values) for k, v in self.labels.items()},
        }
        return JobRequest.model_validate(fields)


def parse_rules(text: str, where: str) -> list[MlflowRule]:
    """Parse and check a rules document (each rule's job built for a placeholder version)."""
    return rules_file.parse_rules(
        text,
        where,
        MlflowRule,
        lambda rule: rule.job_request("model", "1", "s3://placeholder-bucket/model/"),
        MlflowRulesError,
    )


class MlflowRulesFile(RulesFile[MlflowRule]):
    """The rules of one file, re-parsed when its mtime or size changes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, parse_rules, MlflowRulesError)

    def match(self, name: str, event: str) -> MlflowRule | None:
        return next((rule for rule in self.rules() if rule.matches(name, event)), None)
