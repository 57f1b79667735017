"""The NPS search loop (worker/evaluation/nps_search.py) on a synthetic fitness landscape: no
model, so the CMA-ES bookkeeping (the all-ones candidate first, seeding, budgets, rejection,
fitness definitions) is checked in milliseconds. The search on a real model pair is in
tests/evaluation/test_nps_job.py."""

from __future__ import annotations

import math

import pytest

from worker.evaluation.nps_search import REJECTED, fitness_of, run_search
from worker.evaluation.search import Point
from worker.spec import NpsSpec

EDGES = [0.0, 0.05, 0.1, 0.2, 1.0]  # 4 bands
TARGET = [1.8, 1.4, 0.6, 0.2]  # the weights the synthetic landscape rewards


def point(skill: float, kept: float | None, ppl: float, left: float | None, loss=1.0) -> Point:
    return Point("nps", 0.9, skill, kept, loss, ppl, left, False, 0.0, 0.0)


def landscape(calls: list[list[float]]):
    """skill rises as the weights approach TARGET, in steps of 1/50 (50 task examples)."""

    def measure(weights: list[float]) -> Point:
        calls.append(weights)
        distance = math.sqrt(sum((w - t) ** 2 for w, t in zip(weights, TARGET, strict=True)))
        skill = max(0.0, math.floor(50 * (1.0 - distance / 4)) / 50)
        return point(skill, skill / 0.9, 10.0 + distance, 0.5 + distance / 10)

    return measure


def test_the_all_ones_candidate_comes_first_and_the_search_improves_on_it():
    calls: list[list[float]] = []
    nps = NpsSpec(generations=8, objective="skill", seed=3)
    result = run_search(nps, 0.9, EDGES, landscape(calls), task_examples=50)
    assert calls[0] == [1.0, 1.0, 1.0, 1.0]
    assert result.magnitude.weights == [1.0] * 4 and result.magnitude.generation == 0
    population = 4 + math.floor(3 * math.log(4))
    assert len(calls) == 1 + 8 * population
    assert result.best.fitness > result.magnitude.fitness
    # Every weight CMA-ES asked for lies in the bounds, and is a plain float.
    assert all(0.0 <= w <= 2.5 and type(w) is float for ws in calls for w in ws)
    summary = result.as_dict()
    assert summary["evaluations"] == len(calls)
    assert summary["weights"] == result.best.weights
    assert summary["improvement"] == pytest.approx(result.best.fitness - result.magnitude.fitness)
    best_so_far = [g["best_so_far"] for g in summary["generations"]]
    assert best_so_far == sorted(best_so_far)  # never gets worse
    assert summary["stopped"] == "generations"


def test_the_same_seed_gives_the_same_weights_and_another_seed_others():
    runs = []
    for seed in (5, 5, 6):
        nps = NpsSpec(generations=3, objective="skill", seed=seed)
        runs.append([e.weights for e in run_search(nps, 0.9, EDGES, landscape([]), 50).evaluated])
    assert runs[0] == runs[1]
    assert runs[0][1:] != runs[2][1:]


def test_max_evaluations_stops_with_the_best_so_far():
    calls: list[list[float]] = []
    nps = NpsSpec(generations=50, max_evaluations=7, objective="skill")
    result = run_search(nps, 0.9, EDGES, landscape(calls), 50)
    assert len(calls) == 7 and result.stopped == "max_evaluations"
    assert result.best.fitness == max(e.fitness for e in result.evaluated)


def test_max_seconds_stops_the_search():
    ticks = iter(range(10_000))
    nps = NpsSpec(generations=50, max_seconds=5, objective="skill")
    result = run_search(nps, 0.9, EDGES, landscape([]), 50, clock=lambda: float(next(ticks)))
    assert result.stopped == "max_seconds"
    assert len(result.evaluated) < 1 + 50 * 9


def test_candidates_below_the_floor_are_rejected_and_never_chosen():
    nps = NpsSpec(generations=3, objective="balanced")
    result = run_search(nps, 0.9, EDGES, landscape([]), 50, floor=0.99)
    assert all(e.fitness == REJECTED and e.rejected for e in result.evaluated)
    assert result.best is None
    assert result.as_dict()["fitness"] is None


def test_skill_fitness_breaks_ties_by_completion_loss_only():
    low, high = point(0.5, 0.5, 9, 0.4, loss=0.2), point(0.5, 0.5, 9, 0.4, loss=3.0)
    better = point(0.52, 0.52, 9, 0.4, loss=1e9)  # one more example right, at any loss
    assert fitness_of(low, "skill", 50) > fitness_of(high, "skill", 50)
    assert fitness_of(better, "skill", 50) > fitness_of(low, "skill", 50)


def test_balanced_fitness_is_the_harmonic_mean_of_skill_kept_and_forgetting_removed():
    assert fitness_of(point(0.8, 0.8, 9, 0.4), "balanced", 50) == pytest.approx(
        2 * 0.8 * 0.6 / (0.8 + 0.6)
    )
    # Clipped to [0, 1]: forgetting left above 1 removes nothing; kept above 1 counts as 1.
    assert fitness_of(point(0.8, 1.2, 9, 1.5), "balanced", 50) == 0.0
    assert fitness_of(point(0.8, 1.2, 9, -0.5), "balanced", 50) == 1.0
    # Forgetting undefined: skill kept alone.
    assert fitness_of(point(0.8, 0.7, 9, None), "balanced", 50) == pytest.approx(0.7)
