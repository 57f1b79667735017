"""The merge section of a JobSpec: several fine-tunes of one base combined into one model.

`finetuned` as a list of `MergeInput`s makes a job a merge: each input's task vector is pruned by
its own method and sparsity (the job's when it names none), then the pruned updates are combined
by `merge.rule` (worker/engine/merge_methods/). Option names follow mergekit's (`weight`,
`lambda` as `lam`, `normalize`) so a mergekit config translates one to one.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.spec.nps import MAX_BANDS
from worker.spec.values import NOT_BLANK, not_blank

# Each input is a source opened and read per tensor: the list is bounded.
MAX_MERGE_INPUTS = 32

MergeRule = Literal["task_arithmetic", "ties", "nps_fusion"]
# mergekit's defaults for `normalize`: TIES divides by the weights that agree with the elected
# sign, task arithmetic does not divide.
NORMALIZE_DEFAULT = {"task_arithmetic": False, "ties": True, "nps_fusion": False}


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number")
    return value


class MergeInput(BaseModel):
    """One fine-tune of the merge and how its task vector is pruned before it is combined."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        min_length=1,
        description="The fine-tuned checkpoint (any location), or a PEFT LoRA adapter on the "
        "base with adapter: true.",
        json_schema_extra={"pattern": NOT_BLANK},
    )
    weight: float = Field(default=1.0, description="Its weight in the combination (mergekit's).")
    method: str | None = Field(
        default=None,
        description="How its task vector is pruned (fapm, magnitude, random, dare, "
        "breadcrumbs); default: the job's method.",
    )
    sparsity: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Fraction of its update dropped; default: the job's sparsity.",
    )
    adapter: bool = Field(default=False, description="model is a PEFT LoRA adapter on the base.")
    # Each weight in [0, 100] (as nps.weights), stated in the schema (NaN fails both bounds).
    nps_weights: list[Annotated[float, Field(ge=0.0, le=100.0)]] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_BANDS,
        description='method "nps": this input\'s band weights (one per band at its sparsity, as '
        "nps.weights for one pair), e.g. a merge search's result; without them an evaluated "
        "merge searches them.",
    )
    task: str | None = Field(
        default=None,
        min_length=1,
        description='evaluate on a merge: this fine-tune\'s task set (JSONL of {"prompt", '
        '"completion"}, any location evaluate.task takes); its skill is measured on it, and the '
        "merge's skill kept is the mean over the inputs' tasks. Required with evaluate.",
        json_schema_extra={"pattern": NOT_BLANK},
    )

    @field_validator("model")
    @classmethod
    def _model_not_blank(cls, value: str) -> str:
        return not_blank(value)

    @field_validator("task")
    @classmethod
    def _task_not_blank(cls, value: str | None) -> str | None:
        return None if value is None else not_blank(value)

    @field_validator("weight")
    @classmethod
    def _weight_finite(cls, value: float) -> float:
        return _finite(value, "weight")


class MergeSpec(BaseModel):
    """How the pruned task vectors T_i (weights w_i) are combined over the base W."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: MergeRule = Field(
        default="task_arithmetic",
        description="task_arithmetic: W + lam * sum_i w_i T_i (mergekit task_arithmetic); "
        "ties: sign elected by sum_i w_i T_i, disjoint mean of the agreeing updates (mergekit "
        "ties, dare_ties with method dare and normalize false); nps_fusion: W + sum_i lam w_i "
        "T_i / max(#i with T_i != 0, 1), entry-wise (NPS's fusion rule).",
    )
    lam: float = Field(default=1.0, description="Scale on the combined update (mergekit's lambda).")
    normalize: bool | None = Field(
        default=None,
        description="task_arithmetic and ties: divide by the sum of the (agreeing) weights; "
        "default as mergekit: true for ties, false for task_arithmetic.",
    )

    @field_validator("lam")
    @classmethod
    def _lam_finite(cls, value: float) -> float:
        return _finite(value, "lam")

    @property
    def normalized(self) -> bool:
        """`normalize`, or the rule's default when the job gave none."""
        return NORMALIZE_DEFAULT[self.rule] if self.normalize is None else self.normalize


# What a merge does not do yet (a 422 naming the field).
NOT_FOR_MERGES = "not yet for merges"
