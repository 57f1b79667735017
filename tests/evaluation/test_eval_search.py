"""The choice among evaluated points: the least perplexity that keeps the floor, ties to the
lower sparsity, never sparsity 0, never a point whose perplexity is NaN."""

from __future__ import annotations

import math

from worker.evaluation.search import Point, choose


def point(sparsity: float, perplexity: float, meets: bool = True) -> Point:
    return Point("magnitude", sparsity, 1.0, 1.0, 0.1, perplexity, None, meets, 0.0, 0.0)


def test_the_least_perplexity_that_keeps_the_floor_ties_to_the_lower_sparsity():
    points = [point(0.3, 5.0), point(0.7, 4.0), point(0.5, 4.0), point(0.9, 3.0, meets=False)]
    assert choose(points) == point(0.5, 4.0)
    assert choose([point(0.0, 1.0)]) is None


def test_a_nan_perplexity_is_never_chosen_wherever_it_is():
    nan = point(0.9, math.nan)
    for points in ([nan, point(0.5, 4.0)], [point(0.5, 4.0), nan]):
        assert choose(points) == point(0.5, 4.0)
    assert choose([nan]) is None
