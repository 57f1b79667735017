"""The typed job descriptions: JobSpec (a pruning job, with a section per operation) and
EvaluationJobSpec (a standalone evaluation).

The CLI generates its flags from these fields (`worker/cli/spec_flags.py`), the API validates REST bodies with
them, the Celery message carries them, and the model card and report embed them. This package
imports no torch so the API can use it.

Validation errors are pydantic `ValidationError`s, which are `ValueError`s that name the field.
"""

from worker.spec.evaluation import (
    JOB_KINDS,
    EvaluationJobSpec,
    EvaluationSpec,
    JobKind,
    TargetSpec,
)
from worker.spec.job import (
    CALIBRATED_METHODS,
    METHOD_NAMES,
    MODEL_SCOPE_METHODS,
    TASK_VECTOR_METHODS,
    WEIGHT_METHODS,
    JobSpec,
    MethodName,
)
from worker.spec.nps import NpsSpec
from worker.spec.values import NOT_BLANK, ByteSize, Sparsity, parse_byte_size, parse_sparsity
from worker.spec.weights import CalibrationSpec

__all__ = [
    "CALIBRATED_METHODS",
    "JOB_KINDS",
    "METHOD_NAMES",
    "MODEL_SCOPE_METHODS",
    "NOT_BLANK",
    "TASK_VECTOR_METHODS",
    "WEIGHT_METHODS",
    "ByteSize",
    "CalibrationSpec",
    "EvaluationJobSpec",
    "EvaluationSpec",
    "JobKind",
    "JobSpec",
    "MethodName",
    "NpsSpec",
    "Sparsity",
    "TargetSpec",
    "parse_byte_size",
    "parse_sparsity",
]
