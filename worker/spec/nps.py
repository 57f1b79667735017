"""The NPS section: searched band re-weighting of the task vector (ALGORITHMS.md "NPS").

`band_edges(sparsity, nps)` is the one definition of the bands, shared by the spec's checks, the
engine and the search, and it needs no torch.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_BANDS = 8
MAX_BANDS = 64


class NpsSpec(BaseModel):
    """How NPS searches the weight of each magnitude band of the task vector."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bands: int = Field(
        default=DEFAULT_BANDS,
        ge=2,
        le=MAX_BANDS,
        description="Number of bands M; the inner cuts are geometric around the keep boundary "
        "(r/4 ... r ... 4r of the |D| rank order, r = 1 - sparsity), clipped to (0, 1).",
    )
    band_edges: list[float] | None = Field(
        default=None,
        min_length=2,
        max_length=MAX_BANDS + 1,
        description="Explicit band edges as rank fractions, 0 = e_0 < e_1 < ... < e_M = 1 "
        "(instead of bands).",
    )
    bounds: tuple[float, float] = Field(
        default=(0.0, 2.5), description="Each band weight is searched in [lo, hi]."
    )
    sigma0: float = Field(default=0.3, gt=0.0, le=10.0, description="CMA-ES initial step size.")
    population: int | None = Field(
        default=None,
        ge=2,
        le=256,
        description="CMA-ES population per generation (default 4 + floor(3 ln M)).",
    )
    generations: int = Field(default=20, ge=1, le=1000, description="CMA-ES generations.")
    objective: Literal["skill", "balanced"] = Field(
        default="balanced",
        description="skill: task skill, ties to the lower completion loss (the paper); balanced: "
        "harmonic mean of skill kept and 1 - forgetting left (needs evaluate.general).",
    )
    lam: float = Field(
        default=1.0, gt=0.0, le=100.0, description="Rescale of the kept, re-weighted update."
    )
    seed: int = Field(default=0, ge=0, lt=2**31, description="Seed of the CMA-ES search.")
    max_evaluations: int | None = Field(
        default=None, ge=1, description="Stop the search after this many candidate evaluations."
    )
    max_seconds: float | None = Field(
        default=None, gt=0.0, description="Stop the search after this many seconds."
    )
    weights: list[float] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_BANDS,
        description="Publish with these band weights, without a search (e.g. a reported result); "
        "one per band.",
    )

    @field_validator("band_edges")
    @classmethod
    def _edges_increase(cls, edges: list[float] | None) -> list[float] | None:
        if edges is None:
            return None
        if edges[0] != 0.0 or edges[-1] != 1.0:
            raise ValueError("must start at 0 and end at 1")
        if any(not b > a for a, b in itertools.pairwise(edges)):
            raise ValueError("must increase strictly")
        return edges

    @field_validator("bounds")
    @classmethod
    def _bounds_order(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        lo, hi = bounds
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 100.0):
            raise ValueError("must be [lo, hi] with 0 <= lo < hi <= 100")
        return bounds

    @field_validator("weights")
    @classmethod
    def _weights_finite(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and any(not (math.isfinite(w) and 0 <= w <= 100) for w in weights):
            raise ValueError("each weight must be a number in [0, 100]")
        return weights

    @model_validator(mode="after")
    def _bands_agree(self) -> NpsSpec:
        if self.band_edges is not None and "bands" in self.model_fields_set:
            if self.bands != len(self.band_edges) - 1:
                raise ValueError("bands: give bands or band_edges, not both")
        return self

    def population_size(self, bands: int) -> int:
        return self.population or 4 + math.floor(3 * math.log(bands))


def band_edges(sparsity: float, nps: NpsSpec) -> list[float]:
    """The rank-fraction edges 0 = e_0 < ... < e_M = 1 at this sparsity (ALGORITHMS.md): the
    user's, or M bands with the inner cuts geometric around the keep ratio r = 1 - sparsity.
    Cuts outside (0, 1) and duplicates are removed, so M can be smaller than asked."""
    if nps.band_edges is not None:
        return list(nps.band_edges)
    r = 1.0 - sparsity
    m = nps.bands
    if m == 2:
        inner = [r]
    else:
        inner = [r * 4.0 ** (-1.0 + 2.0 * (i - 1) / (m - 2)) for i in range(1, m)]
    cuts = sorted({c for c in inner if 0.0 < c < 1.0})
    return [0.0, *cuts, 1.0]
