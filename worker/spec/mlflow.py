"""The `mlflow` section: how a result published to `mlflow://<registered model name>` is named.

Alias names follow MLflow's own rules (mlflow/utils/validation.py: letters, digits, `_` and `-`,
at most 255 characters; `latest` and `v<digits>` are reserved for MLflow's version aliases), so a
bad alias is a 422 at submission, not a failed job after the prune.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

MLFLOW_SCHEME = "mlflow://"
_ALIAS = re.compile(r"[A-Za-z0-9_-]{1,255}")
_VERSION_ALIAS = re.compile(r"[vV]\d+")


def check_alias(value: str) -> str:
    """`value` if MLflow accepts it as a registered model alias, else ValueError."""
    if not _ALIAS.fullmatch(value):
        raise ValueError(
            f"alias {value!r}: 1-255 letters, digits, underscores (_) and dashes (-) (MLflow's rule)"
        )
    if value.lower() == "latest" or _VERSION_ALIAS.fullmatch(value):
        raise ValueError(f"alias {value!r}: reserved by MLflow (latest, v<number>)")
    return value


class MlflowSpec(BaseModel):
    """Options of a model version that a job registers in an MLflow Model Registry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alias: str | None = Field(
        default=None,
        description="Alias set on the registered version (moved from the version that held it), "
        "so a deployer picks the pruned model as models:/NAME@ALIAS.",
        json_schema_extra={"examples": ["pruned"]},
    )

    @field_validator("alias")
    @classmethod
    def _alias_is_mlflows(cls, value: str | None) -> str | None:
        return None if value is None else check_alias(value)


def _only_with_mlflow_output(value: MlflowSpec | None, info: ValidationInfo) -> MlflowSpec | None:
    # `output` is declared before this section in JobSpec, so it is validated (or missing) here.
    output = info.data.get("output")
    if value is not None and isinstance(output, str) and not output.startswith(MLFLOW_SCHEME):
        raise ValueError("applies to an output mlflow://<registered model name> only")
    return value


MlflowSection = Annotated[MlflowSpec | None, AfterValidator(_only_with_mlflow_output)]
