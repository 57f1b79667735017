"""The weight-pruning section: calibration of task-aware Wanda / SparseGPT (ALGORITHMS.md
"Task-aware weight pruning"), and the N:M pattern rule."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.spec.values import NOT_BLANK, not_blank

CalibrationMode = Literal["general", "task", "mixed", "taskaware"]
_PATTERN = re.compile(r"^([1-9][0-9]?):([1-9][0-9]?)$")


class CalibrationSpec(BaseModel):
    """Which activations weigh the weights: a general set, a task set, or both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: CalibrationMode = Field(
        default="taskaware",
        description="general (plain Wanda/SparseGPT), task, mixed (both sets as one) or "
        "taskaware (scores fused per input channel by where the two sets' activations differ).",
    )
    general: str | None = Field(
        default=None,
        min_length=1,
        description='JSONL of {"text"} lines (general text, e.g. a C4 sample); any location.',
        json_schema_extra={"pattern": NOT_BLANK},
    )
    task: str | None = Field(
        default=None,
        min_length=1,
        description='JSONL of {"prompt", "completion"} lines (prompt + completion as one text).',
        json_schema_extra={"pattern": NOT_BLANK},
    )
    max_examples: int = Field(default=128, ge=1, le=4096, description="Sequences per set.")
    max_tokens: int = Field(
        default=2048,
        ge=2,
        le=131072,
        description="Tokens per sequence (never above the model's positions).",
    )
    exclusive_frac: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="taskaware: fraction of input channels, by |log activation ratio|, that are "
        "exclusive to one set.",
    )
    beta: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="taskaware: weight of the general score on shared channels.",
    )

    @field_validator("general", "task")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        return None if value is None else not_blank(value)

    @property
    def needs_general(self) -> bool:
        return self.mode in ("general", "mixed", "taskaware")

    @property
    def needs_task(self) -> bool:
        return self.mode in ("task", "mixed", "taskaware")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """(n, m) of an "N:M" pattern.

    "2:4" keeps 2 of every 4 consecutive weights of a row: density N/M, sparsity 1 - N/M."""
    match = _PATTERN.match(pattern)
    if not match:
        raise ValueError('must be "N:M" with 0 < N < M, e.g. "2:4" or "4:8"')
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError('must be "N:M" with 0 < N < M, e.g. "2:4" or "4:8"')
    return n, m
