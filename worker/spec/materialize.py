"""The `materialize` section: rebuild the dense model from a sparse delta and its base.

A job with `materialize: {delta: URI}` reads a directory written by a prune job with
`output_format: "sparse-delta"` (worker/io/sparse_delta.py) and the job's `base`, and publishes
at `output` the dense model that job would have published with `output_format: "dense"`, bit
for bit (worker/engine/materialize.py). A base whose weight files differ from the ones the delta
names (sha256) is refused with `base_mismatch`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.spec.values import NOT_BLANK, not_blank


class MaterializeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    delta: str = Field(
        min_length=1,
        description='A sparse delta (a prune output with output_format "sparse-delta"): a local '
        "directory, file://, s3://bucket/prefix/ or hf://org/name@rev.",
        json_schema_extra={"pattern": NOT_BLANK},
    )

    @field_validator("delta")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        return not_blank(value)
