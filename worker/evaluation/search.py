"""Auto-sparsity: the least forgetting that keeps the skill floor, in a handful of evaluations.

Per method: a coarse pass at sparsities 0.1, 0.3, 0.5, 0.7 and 0.9, then bisection between the
highest coarse sparsity that keeps the floor and the next one up (1.0 above 0.9; 0 and 0.1 when
none keeps it), three steps, to a resolution of 0.025: 8 evaluations per method where a grid at
that resolution needs 40. Skill usually falls and forgetting shrinks as sparsity grows, so the
bisection looks for the highest sparsity that still keeps the floor; the coarse pass guards
against a curve that is not monotone, and the choice is made over every evaluated point anyway:
among the points that keep the floor, the lowest perplexity (the least forgetting left: the ratio
orders points as perplexity does), ties to the lower sparsity (the smaller change).

Sparsity 0 is the fine-tuned model itself (skill kept 1 by definition) and is never a candidate:
publishing it would not prune anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

COARSE = (0.1, 0.3, 0.5, 0.7, 0.9)
BISECT_STEPS = 3
# skill_kept is a ratio of accuracies: 19/20 must count as 0.95.
FLOOR_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Point:
    """One evaluated model."""

    method: str  # "base" and "finetuned" for the two references
    sparsity: float
    skill: float
    skill_kept: float | None
    completion_loss: float
    perplexity: float
    forgetting_left: float | None
    meets_floor: bool
    seconds: float  # evaluating it
    build_seconds: float  # writing the candidate's weights into the model
    # A merge: each input's task set and the numbers on it (skill, skill_kept, completion_loss);
    # skill, skill_kept and completion_loss above are their means. None for a single pair.
    tasks: tuple[dict, ...] | None = None

    def as_dict(self) -> dict:
        values = asdict(self)
        if self.tasks is None:  # a single pair's report has no per-task list
            del values["tasks"]
        return values


def meets(skill_kept: float | None, floor: float) -> bool:
    return skill_kept is not None and skill_kept >= floor - FLOOR_TOLERANCE


def evaluations_per_method() -> int:
    return len(COARSE) + BISECT_STEPS


def search_method(method: str, measure: Callable[[str, float], Point]) -> list[Point]:
    """Every point evaluated for one method, in the order evaluated."""
    points = [measure(method, s) for s in COARSE]
    passing = [p.sparsity for p in points if p.meets_floor]
    if passing:
        lo = max(passing)
        hi = min([s for s in COARSE if s > lo], default=1.0)
    else:
        lo, hi = 0.0, COARSE[0]
    for _ in range(BISECT_STEPS):
        mid = round((lo + hi) / 2, 6)
        point = measure(method, mid)
        points.append(point)
        lo, hi = (mid, hi) if point.meets_floor else (lo, mid)
    return points


def choose(points: list[Point]) -> Point | None:
    """The point with the least forgetting among those that keep the floor, or None. A point
    whose perplexity is NaN (a candidate that overflowed, e.g. in float16) is never chosen: NaN
    compares false both ways, so `min` would otherwise pick it or not by position."""
    keeping = [
        p for p in points if p.meets_floor and 0.0 < p.sparsity and not math.isnan(p.perplexity)
    ]
    if not keeping:
        return None
    return min(keeping, key=lambda p: (p.perplexity, p.sparsity))
