"""The evaluation section (what to measure on), sparsity "auto"'s target, and the standalone
evaluation job (EvaluationJobSpec)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.spec.values import NOT_BLANK, not_blank


class EvaluationSpec(BaseModel):
    """What to measure a model on (worker/evaluation/)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str | None = Field(
        default=None,
        description='JSONL file of {"prompt", "completion"} lines (a path, file://, '
        "s3://bucket/prefix/file.jsonl or hf://org/name[@rev]/file.jsonl): skill = exact-match "
        "accuracy of the greedy completion. Required, but for a merge, whose inputs name their "
        "own (finetuned[i].task).",
        min_length=1,
        json_schema_extra={"cli": "--task", "pattern": NOT_BLANK},
    )
    general: str | None = Field(
        default=None,
        description='JSONL file of {"text"} lines: general ability = perplexity. Required but '
        'for method "nps" with objective "skill".',
        min_length=1,
        json_schema_extra={"cli": "--general", "pattern": NOT_BLANK},
    )
    max_examples: int | None = Field(
        default=None, ge=1, description="Use only the first N lines of each set."
    )
    batch_size: int = Field(
        default=16, ge=1, le=4096, description="Sequences per forward pass in evaluation."
    )

    @field_validator("task", "general")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        return None if value is None else not_blank(value)


# A single model is measured on evaluate.task (a merge's inputs name their own task sets).
TASK_REQUIRED = (
    'evaluate.task: required: the JSONL of {"prompt", "completion"} skill is measured on'
)


JobKind = Literal["prune", "evaluation"]
JOB_KINDS: tuple[str, ...] = JobKind.__args__  # type: ignore[attr-defined]


class EvaluationJobSpec(BaseModel):
    """A standalone evaluation (job kind "evaluation"): measure a model the user already has
    against its base, as `fapm eval` does (worker/evaluation/standalone.py). Nothing is pruned
    or published; the job's result carries the measured points."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(
        description="Base (pre-trained) checkpoint the model is compared with: a local "
        "directory, file:// URI, s3://bucket/prefix/ or hf://org/name@rev.",
        min_length=1,
        json_schema_extra={"examples": ["hf://meta-llama/Llama-3.1-8B@main"], "pattern": NOT_BLANK},
    )
    model: str = Field(
        description="The model to measure (e.g. a pruned or fine-tuned checkpoint), any location.",
        min_length=1,
        json_schema_extra={
            "examples": ["s3://acme-pruned/llama-3.1-8b-sft/"],
            "pattern": NOT_BLANK,
        },
    )
    finetuned: str | None = Field(
        default=None,
        description="Fine-tuned reference: with it, the model's skill_kept and forgetting_left "
        "are relative to it (as for a pruned candidate); without it they are relative to the "
        "model itself (1 by definition) and the numbers to read are skill and perplexity.",
    )
    evaluate: EvaluationSpec = Field(description="The task and general sets to measure on.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Compute device: auto picks CUDA when present."
    )

    @field_validator("base", "model")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        return not_blank(value)

    @model_validator(mode="after")
    def _general_given(self) -> EvaluationJobSpec:
        if self.evaluate.task is None:
            raise ValueError(TASK_REQUIRED)
        if self.evaluate.general is None:
            raise ValueError("evaluate: general: required to measure forgetting (perplexity)")
        return self


class TargetSpec(BaseModel):
    """What sparsity "auto" aims for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_skill_kept: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="Skill floor: the pruned model keeps at least this fraction of the "
        "fine-tuned model's skill.",
    )
