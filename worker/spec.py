"""JobSpec: the one typed description of a pruning job (and EvaluationJobSpec, of a standalone
evaluation).

The CLI generates its flags from these fields (`worker/cli.py`), the API validates REST bodies with
it, the Celery message carries it, and the model card and report embed it. This module imports no
torch so the API can use it.

Validation errors are pydantic `ValidationError`s, which are `ValueError`s that name the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from worker.exclude_pattern import MAX_EXCLUDE_CHARS, ExcludePattern

# Method names are listed here, not imported from the engine, so this module stays torch-free;
# tests/unit/test_methods.py checks that this list and the engine's registry agree.
MethodName = Literal["fapm", "magnitude", "random", "dare", "breadcrumbs"]
METHOD_NAMES: tuple[str, ...] = MethodName.__args__  # type: ignore[attr-defined]
# Methods that rank entries by a score, so one threshold can span the whole model.
MODEL_SCOPE_METHODS = ("fapm", "magnitude", "random")

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_byte_size(value: int | str) -> int:
    """Parse a byte count: an int, or a string with an optional unit (`500MB`, `5GB`, `1GiB`).

    Units are decimal (KB, MB, GB, TB) or binary (KiB, MiB, GiB, TiB), as the Hugging Face tooling
    accepts them. Raises ValueError for anything else or a size below one byte.
    """
    if isinstance(value, bool):
        raise ValueError("a byte size must be a number or a string like '5GB'")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(str(value))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ValueError(
                f"cannot parse byte size {value!r}: use e.g. 5GB, 500MB, 1GiB or bytes"
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise ValueError("a byte size must be at least 1 byte")
    return size


ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]


def parse_sparsity(value: object) -> float | str:
    """A number in [0, 1], or "auto". One validator (not a pydantic union) so an error names
    the field `sparsity` alone, as every other field's does."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool):
        raise ValueError('must be a number in [0, 1] or "auto"')
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError('must be a number in [0, 1] or "auto"') from None
    if not 0.0 <= number <= 1.0:
        raise ValueError("must be in [0, 1] (0.9 drops 90% of each tensor's update)")
    return number


Sparsity = Annotated[
    float | Literal["auto"],
    BeforeValidator(parse_sparsity),
    Field(json_schema_extra={"minimum": 0.0, "maximum": 1.0}),
]


# `_not_blank` for the JSON schema: at least one character that str.strip() keeps (Python's
# whitespace: JSON Schema's `\S` would let "\x1f" through).
NOT_BLANK = r"[^\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


class EvaluationSpec(BaseModel):
    """What to measure a model on (worker/evaluation/)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(
        description='JSONL file of {"prompt", "completion"} lines (a path, file://, '
        "s3://bucket/prefix/file.jsonl or hf://org/name[@rev]/file.jsonl): skill = exact-match "
        "accuracy of the greedy completion.",
        min_length=1,
        json_schema_extra={"cli": "--task", "pattern": NOT_BLANK},
    )
    general: str = Field(
        description='JSONL file of {"text"} lines: general ability = perplexity.',
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
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


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
        if not value.strip():
            raise ValueError("must not be empty")
        return value


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


class JobSpec(BaseModel):
    """What to prune, how, and where the result goes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(
        description="Base (pre-trained) checkpoint: a local directory, file:// URI, "
        "s3://bucket/prefix/ or hf://org/name@rev.",
        min_length=1,
        json_schema_extra={"examples": ["hf://meta-llama/Llama-3.1-8B@main"], "pattern": NOT_BLANK},
    )
    finetuned: str | None = Field(
        default=None,
        description="Fine-tuned checkpoint with the same architecture. Give this or --adapter.",
    )
    adapter: str | None = Field(
        default=None,
        description="PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) on top "
        "of the base, instead of --finetuned.",
    )
    output: str = Field(
        description="Where the pruned model directory goes.",
        min_length=1,
        json_schema_extra={"cli": "--out", "pattern": NOT_BLANK},
    )
    method: MethodName = Field(default="fapm", description="Pruning method.")
    sparsity: Sparsity = Field(
        default=0.9,
        description="Fraction of each tensor's update that is dropped (0.9 keeps 10%), or "
        '"auto": search for the least forgetting that keeps the skill floor (needs evaluate).',
    )
    alpha: float = Field(
        default=1.0, ge=0.0, description="fapm: weight of the relative-change penalty."
    )
    gamma: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="breadcrumbs: fraction of largest updates dropped as outliers.",
    )
    scale: float = Field(
        default=1.0, description="Multiplier on the kept update (1.0 selects fine-tuned weights)."
    )
    seed: int = Field(default=0, ge=0, description="Seed for the random and dare methods.")
    exclude: str | None = Field(
        default=None,
        max_length=MAX_EXCLUDE_CHARS,
        description="Regular expression on tensor names (RE2 syntax: no backreferences or "
        "lookaround), matched anywhere in the name; matching tensors keep their whole update "
        "(copied from the fine-tuned model). E.g. 'embed|norm|lm_head|bias'.",
    )
    scope: Literal["tensor", "row", "model"] = Field(
        default="tensor",
        description="Where the top-k is taken: within each tensor, each output row, or over the "
        "whole model (fapm, magnitude and random; two extra streaming passes).",
    )
    shard_size: ByteSize = Field(
        default=5 * 10**9,
        description="Largest output shard in bytes; units accepted (500MB, 5GB, 1GiB).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Compute device: auto picks CUDA when present."
    )
    dtype: Literal["keep", "bfloat16", "float16", "float32"] = Field(
        default="keep", description="Storage dtype of the output's floating-point tensors."
    )
    kernel: Literal["auto", "torch", "numba", "triton"] = Field(
        default="auto",
        description="Implementation: auto uses the fused kernel where it covers the method "
        "(triton on CUDA, numba on CPU); triton on CPU needs TRITON_INTERPRET=1 (interpreter).",
    )
    evaluate: EvaluationSpec | None = Field(
        default=None,
        description="Measure skill and forgetting of the base, the fine-tune and the pruned "
        'model(s); required by sparsity "auto".',
    )
    target: TargetSpec | None = Field(
        default=None, description='sparsity "auto": the skill floor (default 0.95).'
    )
    methods: list[MethodName] | None = Field(
        default=None,
        min_length=1,
        description='sparsity "auto": the methods to search (default: method).',
    )
    overwrite: bool = Field(default=False, description="Replace an existing output.")

    @field_validator("exclude")
    @classmethod
    def _exclude_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            ExcludePattern(value)  # ValueError: too long, or not linear-time (RE2) syntax
        return value

    @field_validator("base", "output")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _scope_fits_method(self) -> JobSpec:
        if self.scope == "model" and self.method not in MODEL_SCOPE_METHODS:
            raise ValueError(
                f"scope: 'model' applies to {', '.join(MODEL_SCOPE_METHODS)}, not {self.method}"
            )
        return self

    @model_validator(mode="after")
    def _one_update_source(self) -> JobSpec:
        if (self.finetuned is None) == (self.adapter is None):
            raise ValueError("finetuned: give exactly one of 'finetuned' and 'adapter'")
        return self

    @model_validator(mode="after")
    def _auto_needs_evaluation(self) -> JobSpec:
        if self.sparsity == "auto":
            if self.evaluate is None:
                raise ValueError(
                    'evaluate: sparsity "auto" needs evaluate {task, general} to measure with'
                )
        else:
            if self.target is not None:
                raise ValueError('target: applies to sparsity "auto" only')
            if self.methods is not None:
                raise ValueError('methods: applies to sparsity "auto" only (use method)')
        if self.methods is not None and len(set(self.methods)) != len(self.methods):
            raise ValueError("methods: each method once")
        if self.evaluate is not None and self.scope == "model":
            # Candidates are built per tensor; scope model's global threshold needs the engine's
            # two counting passes, which the candidate builder does not run.
            what = 'sparsity "auto"' if self.sparsity == "auto" else "evaluate"
            raise ValueError(f"scope: {what} works with scope tensor or row, not model")
        return self

    @property
    def auto(self) -> bool:
        return self.sparsity == "auto"

    @property
    def search_methods(self) -> list[str]:
        """The methods sparsity "auto" searches."""
        return list(self.methods or [self.method])

    @property
    def density(self) -> float:
        """Fraction of each tensor's entries whose update is kept (not for sparsity "auto")."""
        if self.sparsity == "auto":
            raise ValueError('sparsity "auto" has no density until the search chose one')
        return 1.0 - self.sparsity
