"""JobSpec: the one typed description of a pruning job, with a section per operation.

Sections live beside it: `evaluation.py` (evaluate, target), `nps.py` (the NPS search).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.exclude_pattern import MAX_EXCLUDE_CHARS, ExcludePattern
from worker.spec.evaluation import TASK_REQUIRED, EvaluationSpec, TargetSpec
from worker.spec.materialize import MaterializeSpec
from worker.spec.merge import MergeInput, MergeSpec
from worker.spec.merge_checks import check_merge
from worker.spec.mlflow import MlflowSection
from worker.spec.nps import NpsSpec, band_edges
from worker.spec.values import NOT_BLANK, ByteSize, Sparsity, not_blank
from worker.spec.weights import CalibrationSpec, parse_pattern

# Method names are listed here, not imported from the engine, so this module stays torch-free;
# tests/unit/test_methods.py checks that this list and the engine's registry agree.
MethodName = Literal[
    "fapm", "magnitude", "random", "dare", "breadcrumbs", "nps", "wanda", "sparsegpt"
]
METHOD_NAMES: tuple[str, ...] = MethodName.__args__  # type: ignore[attr-defined]
# Methods that rank entries by a score, so one threshold can span the whole model.
MODEL_SCOPE_METHODS = ("fapm", "magnitude", "random", "nps")
# Methods that search on the user's data (they need evaluate unless told their result).
SEARCHED_METHODS = ("nps",)
# What each operation ("prune") accepts: the task vector's methods, or the weights' own.
WEIGHT_METHODS = ("wanda", "sparsegpt", "magnitude")
CALIBRATED_METHODS = ("wanda", "sparsegpt")
TASK_VECTOR_METHODS = tuple(m for m in METHOD_NAMES if m not in CALIBRATED_METHODS)


class JobSpec(BaseModel):
    """What to prune, how, and where the result goes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prune: Literal["task_vector", "weights"] = Field(
        default="task_vector",
        description="What is pruned: the task vector (finetuned - base, kept against the base) "
        "or the weights of one model (model; Wanda, SparseGPT, magnitude).",
    )
    base: str | None = Field(
        default=None,
        description="Base (pre-trained) checkpoint: a local directory, file:// URI, "
        "s3://bucket/prefix/ or hf://org/name@rev. Required to prune a task vector.",
        min_length=1,
        json_schema_extra={"examples": ["hf://meta-llama/Llama-3.1-8B@main"], "pattern": NOT_BLANK},
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        description='prune "weights": the model whose weights are pruned (any location).',
        json_schema_extra={"pattern": NOT_BLANK},
    )
    finetuned: str | list[MergeInput] | None = Field(
        default=None,
        description="Fine-tuned checkpoint with the same architecture. Give this or --adapter. "
        "A list of {model, weight, method?, sparsity?, adapter?, task?, nps_weights?} merges "
        "several fine-tunes of the base (see merge).",
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
    output_format: Literal["dense", "sparse-delta"] = Field(
        default="dense",
        description='"dense": a model directory; "sparse-delta": only the entries that differ '
        "from the base (mask or indices, and values), rebuilt bit for bit by materialize.",
        json_schema_extra={"cli": "--format"},
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
        default=None,
        description='sparsity "auto": the skill floor (default 0.95); an NPS search: rejects '
        "candidates below it (no floor by default).",
    )
    methods: list[MethodName] | None = Field(
        default=None,
        min_length=1,
        description='sparsity "auto": the methods to search (default: method).',
    )
    calibration: CalibrationSpec | None = Field(
        default=None,
        description='prune "weights" with wanda or sparsegpt: the calibration sets and mode.',
    )
    pattern: str | None = Field(
        default=None,
        description='prune "weights": an N:M pattern ("2:4", "4:8"), N kept of every M '
        "consecutive weights of a row; sparsity must then be 1 - N/M.",
    )
    nps: NpsSpec | None = Field(
        default=None,
        description='method "nps": how the band weights are searched (defaults apply when absent).',
    )
    merge: MergeSpec | None = Field(
        default=None,
        description="finetuned as a list: how the pruned task vectors are combined "
        "(default: task_arithmetic).",
    )
    mlflow: MlflowSection = Field(
        default=None, description="output mlflow://NAME: the registered version's alias."
    )
    overwrite: bool = Field(default=False, description="Replace an existing output.")
    materialize: MaterializeSpec | None = Field(
        default=None,
        description="Rebuild the dense model from a sparse delta (delta) on base: no pruning.",
    )

    @field_validator("exclude")
    @classmethod
    def _exclude_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            ExcludePattern(value)  # ValueError: too long, or not linear-time (RE2) syntax
        return value

    @field_validator("base", "output")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        return None if value is None else not_blank(value)

    @field_validator("pattern")
    @classmethod
    def _pattern_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_pattern(value)
        return value

    @model_validator(mode="after")
    def _operation_inputs(self) -> JobSpec:
        if self.materialize is not None:
            return self._materialize_fits()
        if self.prune == "weights":
            return self._weights_fit()
        if self.base is None:
            raise ValueError("base: required to prune a task vector (finetuned - base)")
        for name in ("model", "calibration", "pattern"):
            if getattr(self, name) is not None:
                raise ValueError(f'{name}: applies to prune "weights" only')
        if self.method in CALIBRATED_METHODS:
            raise ValueError(f'method: {self.method} prunes weights: set prune "weights" and model')
        return self

    def _materialize_fits(self) -> JobSpec:
        if self.prune != "task_vector" or self.base is None:
            raise ValueError("base: materialize rebuilds the model on its base: give base")
        for name in ("finetuned", "adapter", "model", "evaluate", "calibration", "nps", "merge"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: does not apply to materialize (give base and delta)")
        if self.output_format != "dense":
            raise ValueError('output_format: materialize writes the dense model ("dense")')
        return self

    def _weights_fit(self) -> JobSpec:
        if self.model is None:
            raise ValueError('model: prune "weights" needs the model whose weights are pruned')
        for name in ("base", "finetuned", "adapter", "nps", "target", "methods"):
            if getattr(self, name) is not None:
                raise ValueError(f'{name}: does not apply to prune "weights" (give model)')
        if self.output_format != "dense":
            raise ValueError('output_format: "sparse-delta" stores a task vector against its base')
        if self.method not in WEIGHT_METHODS:
            raise ValueError(f'method: prune "weights" takes {", ".join(WEIGHT_METHODS)}')
        if self.sparsity == "auto":
            raise ValueError('sparsity: prune "weights" takes a number, not "auto"')
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            if abs(self.sparsity - (1 - n / m)) > 1e-9:  # type: ignore[operator]
                raise ValueError(
                    f"sparsity: pattern {self.pattern} keeps {n} of {m}: sparsity must be "
                    f"{1 - n / m:g}, not {self.sparsity:g}"
                )
        calibration = self.calibration
        if self.method in CALIBRATED_METHODS:
            if calibration is None:
                raise ValueError(
                    f"calibration: {self.method} weighs weights by activations: give "
                    "calibration {mode, general, task}"
                )
            if calibration.needs_general and calibration.general is None:
                raise ValueError(f"calibration: general: mode {calibration.mode} needs it")
            if calibration.needs_task and calibration.task is None:
                raise ValueError(f"calibration: task: mode {calibration.mode} needs it")
        elif calibration is not None:
            raise ValueError("calibration: magnitude needs no data (use wanda or sparsegpt)")
        return self

    @model_validator(mode="after")
    def _scope_fits_method(self) -> JobSpec:
        if self.scope == "model" and self.method not in MODEL_SCOPE_METHODS:
            raise ValueError(
                f"scope: 'model' applies to {', '.join(MODEL_SCOPE_METHODS)}, not {self.method}"
            )
        return self

    @model_validator(mode="after")
    def _one_update_source(self) -> JobSpec:
        if self.prune == "weights" or self.materialize is not None:
            return self
        if (self.finetuned is None) == (self.adapter is None):
            raise ValueError("finetuned: give exactly one of 'finetuned' and 'adapter'")
        return self

    @model_validator(mode="after")
    def _merge_fits(self) -> JobSpec:
        check_merge(self, TASK_VECTOR_METHODS)  # worker/spec/merge_checks.py
        return self

    @model_validator(mode="after")
    def _single_model_task_set(self) -> JobSpec:
        if self.evaluate is not None and self.merge_inputs is None and self.evaluate.task is None:
            raise ValueError(TASK_REQUIRED)
        return self

    @model_validator(mode="after")
    def _auto_needs_evaluation(self) -> JobSpec:
        if self.sparsity == "auto":
            if self.evaluate is None:
                sets = (
                    "{general} and a task on each input" if self.merge_inputs else "{task, general}"
                )
                raise ValueError(f'evaluate: sparsity "auto" needs evaluate {sets} to measure with')
        else:
            if self.target is not None and not self.searched:
                raise ValueError('target: applies to sparsity "auto" and the NPS search only')
            if self.methods is not None:
                raise ValueError('methods: applies to sparsity "auto" only (use method)')
        if self.methods is not None and len(set(self.methods)) != len(self.methods):
            raise ValueError("methods: each method once")
        if self.evaluate is not None and self.scope == "model" and self.method != "nps":
            # Candidates are built per tensor; scope model's global threshold needs the engine's
            # two counting passes, which the candidate builder does not run.
            what = 'sparsity "auto"' if self.sparsity == "auto" else "evaluate"
            raise ValueError(f"scope: {what} works with scope tensor or row, not model")
        return self

    @model_validator(mode="after")
    def _nps_section_fits(self) -> JobSpec:
        if self.merge_inputs is not None:  # _merge_nps_fits
            return self
        uses_nps = self.method == "nps" or "nps" in (self.methods or [])
        if self.nps is not None and not uses_nps:
            raise ValueError('nps: applies to method "nps" only')
        if not uses_nps:
            return self
        nps = self.nps_settings
        if self.scope == "row":
            raise ValueError('scope: method "nps" works with scope tensor or model, not row')
        if nps.weights is not None:
            if self.auto:
                raise ValueError('nps: weights are a result; sparsity "auto" searches them')
            bands = len(band_edges(self.sparsity, nps)) - 1  # type: ignore[arg-type]
            if len(nps.weights) != bands:
                raise ValueError(
                    f"nps: weights: {len(nps.weights)} given, the bands at sparsity "
                    f"{self.sparsity:g} are {bands}"
                )
            return self
        if self.evaluate is None:
            raise ValueError(
                'evaluate: method "nps" searches band weights on your data: give evaluate '
                "{task, general} (or nps.weights to publish weights found before)"
            )
        if nps.objective == "balanced" and self.evaluate.general is None:
            raise ValueError(
                'evaluate: general: nps objective "balanced" measures forgetting on it'
            )
        return self

    @model_validator(mode="after")
    def _general_set_given(self) -> JobSpec:
        if self.evaluate is None or self.evaluate.general is not None:
            return self
        skill_only = (
            self.method == "nps" and not self.auto and self.nps_settings.objective == "skill"
        )
        if not skill_only:
            raise ValueError(
                'evaluate: general: required (only nps with objective "skill" runs without it)'
            )
        return self

    @property
    def merge_inputs(self) -> list[MergeInput] | None:
        """The fine-tunes of a merge (finetuned as a list), None for one fine-tune."""
        return self.finetuned if isinstance(self.finetuned, list) else None

    @property
    def merge_settings(self) -> MergeSpec:
        """The merge section, its defaults when the job gave none."""
        return self.merge or MergeSpec()

    @property
    def nps_settings(self) -> NpsSpec:
        """The NPS section, its defaults when the job gave none."""
        return self.nps or NpsSpec()

    @property
    def searched(self) -> bool:
        """An NPS job at a fixed sparsity that searches its weights (not one told them; sparsity
        "auto" searches them at the sparsity where magnitude's order loses the floor). A merge:
        one whose nps inputs name no nps_weights."""
        if self.auto:
            return False
        inputs = self.merge_inputs
        if inputs is not None:
            return any(
                self.input_method(item) == "nps" and item.nps_weights is None for item in inputs
            )
        return self.method == "nps" and self.nps_settings.weights is None

    def input_method(self, item: MergeInput) -> str:
        """A merge input's pruning method: its own, else the job's."""
        return item.method or self.method

    def input_sparsity(self, item: MergeInput) -> float:
        """A merge input's sparsity: its own, else the job's (not for sparsity "auto")."""
        sparsity = self.sparsity if item.sparsity is None else item.sparsity
        assert isinstance(sparsity, float), 'sparsity "auto" has none until the search chose one'
        return sparsity

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
