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
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.jobs import rules_file
from app.jobs.records import JobRequest
from app.jobs.rules_file import RulesFile, fill_placeholders


class HubRulesError(ValueError):
    """The rules file cannot be used (unreadable, not YAML/JSON, or a rule is invalid)."""


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
        fields["output"] = fill_placeholders(self.output, values)
        fields["labels"] = {
            "source": "huggingface",
            "hf_repo": repo,
            "hf_sha": sha,
            **{k: fill_placeholders(v, values) for k, v in self.labels.items()},
        }
        return JobRequest.model_validate(fields)


def parse_rules(text: str, where: str) -> list[HubRule]:
    """Parse and check a rules document (each rule's job built for a placeholder push)."""
    return rules_file.parse_rules(
        text, where, HubRule, lambda rule: rule.job_request("org/name", "0" * 40), HubRulesError
    )


class HubRulesFile(RulesFile[HubRule]):
    """The rules of one file, re-parsed when its mtime or size changes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, parse_rules, HubRulesError)

    def match(self, repo: str) -> HubRule | None:
        return next((rule for rule in self.rules() if rule.matches(repo)), None)
