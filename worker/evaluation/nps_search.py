"""NPS: CMA-ES over the band weights of the task vector, scored on the user's sets.

ALGORITHMS.md "NPS" is the definition. The search asks pycma for candidate weights `w` in
`[lo, hi]^M`, has each candidate written into the work model and measured by the caller's
`measure(weights)` (the evaluation machinery: candidate builder, evaluator, progress, cancel), and
keeps the fittest. The all-ones candidate, which is `magnitude` at the same sparsity, is measured
first, so the result is never less fit than magnitude.

Fitness (higher is better):
- "skill" (the paper's): task accuracy (a merge: the mean skill kept over its inputs' tasks, as
  the paper's multi-task fitness averages per-task accuracy); a tie goes to the lower completion loss. CMA-ES minimises
  one number, so it gets `-(skill) + loss'`, where loss' = min(loss, 100) / (100 * (N + 1)) for N
  task examples: below one example's worth of accuracy, it orders ties only.
- "balanced" (ours): the harmonic mean of skill kept and `1 - forgetting_left`, clipped to [0, 1]
  (forgetting undefined: the fine-tune did not raise perplexity; then skill kept alone, noted).
A candidate whose perplexity is not finite, or below `target.min_skill_kept`, is rejected: it can
never be chosen, and CMA-ES sees it as worse than every accepted one.

Determinism: pycma is seeded (`seed + 1`: pycma reads 0 as "unseeded") and every fitness is a
deterministic function of the weights, so the same job gives the same weights, and the engine the
same bytes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from worker.evaluation.search import Point, meets
from worker.spec import NpsSpec

REJECTED = float("-inf")
# What CMA-ES is told for a rejected candidate: worse than any accepted fitness (which lie in
# [-1, 1] for skill, [0, 1] for balanced).
REJECTED_COST = 10.0


@dataclass(frozen=True)
class Evaluated:
    """One measured candidate of the search."""

    generation: int  # 0: the all-ones (magnitude) candidate
    weights: list[float]
    fitness: float  # REJECTED (-inf, reported as null) when rejected
    rejected: str | None
    point: Point

    def as_dict(self) -> dict:
        return {
            "generation": self.generation,
            "weights": self.weights,
            "fitness": None if self.fitness == REJECTED else self.fitness,
            "rejected": self.rejected,
            "skill": self.point.skill,
            "skill_kept": self.point.skill_kept,
            "completion_loss": self.point.completion_loss,
            "perplexity": self.point.perplexity,
            "forgetting_left": self.point.forgetting_left,
        }


@dataclass
class GenerationSummary:
    index: int
    best: float | None  # of this generation's accepted candidates
    mean: float | None
    best_so_far: float | None
    evaluations: int
    seconds: float
    build_seconds: float  # writing its candidates into the work model
    evaluate_seconds: float  # measuring them


@dataclass
class NpsSearch:
    """What the search did and chose (the report's evaluation "nps" section)."""

    sparsity: float
    edges: list[float]
    lam: float
    objective: str
    evaluated: list[Evaluated] = field(default_factory=list)
    generations: list[GenerationSummary] = field(default_factory=list)
    stopped: str = "generations"  # or "max_evaluations", "max_seconds", "cma: <reason>"
    seconds: float = 0.0
    note: str | None = None
    # A merge: which part of the searched vector is whose (each nps input's band edges and
    # chosen weights, the merge's lam), set by worker/evaluation/merge_job.py.
    merge: dict | None = None

    @property
    def best(self) -> Evaluated | None:
        """The fittest accepted candidate; ties to the earlier (the all-ones candidate first)."""
        best = None
        for e in self.evaluated:
            if e.fitness != REJECTED and (best is None or e.fitness > best.fitness):
                best = e
        return best

    @property
    def magnitude(self) -> Evaluated:
        return self.evaluated[0]

    def as_dict(self) -> dict:
        best = self.best
        return {
            "sparsity": self.sparsity,
            "band_edges": self.edges,
            "bands": len(self.edges) - 1,
            "lam": self.lam,
            "objective": self.objective,
            "weights": None if best is None else best.weights,
            "fitness": None if best is None else best.fitness,
            "magnitude_fitness": (
                None if self.magnitude.fitness == REJECTED else self.magnitude.fitness
            ),
            "improvement": (
                None
                if best is None or self.magnitude.fitness == REJECTED
                else best.fitness - self.magnitude.fitness
            ),
            "generations": [asdict(g) for g in self.generations],
            "evaluations": len(self.evaluated),
            "evaluated": [e.as_dict() for e in self.evaluated],
            "stopped": self.stopped,
            "seconds": self.seconds,
            "note": self.note,
        } | ({} if self.merge is None else {"merge": self.merge})


def fitness_of(point: Point, objective: str, task_examples: int) -> float:
    """The candidate's fitness (higher is better); see the module docstring."""
    if objective == "skill":
        loss = point.completion_loss if math.isfinite(point.completion_loss) else 100.0
        # A merge's skill is its mean skill kept over the inputs' tasks (each task's accuracy
        # relative to its own fine-tune's), not the mean accuracy.
        skill = point.skill if point.tasks is None else point.skill_kept or 0.0
        return skill - min(loss, 100.0) / (100.0 * (task_examples + 1))
    kept = min(max(point.skill_kept or 0.0, 0.0), 1.0)
    if point.forgetting_left is None:
        return kept
    removed = min(max(1.0 - point.forgetting_left, 0.0), 1.0)
    return 0.0 if kept + removed == 0 else 2 * kept * removed / (kept + removed)


def rejection(point: Point, objective: str, floor: float | None) -> str | None:
    """Why a candidate cannot be chosen, or None."""
    if objective == "balanced" and not math.isfinite(point.perplexity):
        return "perplexity is not finite"
    if floor is not None and not meets(point.skill_kept, floor):
        return f"skill kept below the floor {floor:g}"
    return None


def evaluation_budget(nps: NpsSpec, bands: int) -> int:
    """Candidate evaluations the search will run at most (for progress and the ETA)."""
    planned = 1 + nps.generations * nps.population_size(bands)
    return min(planned, nps.max_evaluations) if nps.max_evaluations else planned


def run_search(
    nps: NpsSpec,
    sparsity: float,
    edges: list[float],
    measure: Callable[[list[float]], Point],
    task_examples: int,
    floor: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    start: list[float] | None = None,
) -> NpsSearch:
    """Search the band weights at one sparsity; `measure(weights)` writes and measures a
    candidate (and raises JobCancelled when the job is cancelled). `start`: the first candidate
    and CMA-ES's mean (clipped to the bounds), all ones by default; a merge searches a longer
    vector (every nps input's weights and the merge's lam) from its own start."""
    import cma  # pycma; loaded only by jobs that search

    first = list(start) if start is not None else [1.0] * (len(edges) - 1)
    bands = len(first)
    lo, hi = nps.bounds
    result = NpsSearch(sparsity, edges, nps.lam, nps.objective)
    started = clock()
    if nps.objective == "balanced":
        result.note = None  # set below if forgetting turns out undefined

    def evaluate(weights: list[float], generation: int) -> Evaluated:
        point = measure(weights)
        why = rejection(point, nps.objective, floor)
        fitness = REJECTED if why else fitness_of(point, nps.objective, task_examples)
        if nps.objective == "balanced" and point.forgetting_left is None:
            result.note = (
                "forgetting_left is undefined (the fine-tune did not raise perplexity): the "
                "balanced fitness is skill kept alone"
            )
        evaluated = Evaluated(generation, weights, fitness, why, point)
        result.evaluated.append(evaluated)
        return evaluated

    def out_of_budget() -> str | None:
        if nps.max_evaluations is not None and len(result.evaluated) >= nps.max_evaluations:
            return "max_evaluations"
        if nps.max_seconds is not None and clock() - started >= nps.max_seconds:
            return "max_seconds"
        return None

    gen_started = clock()
    ones = evaluate(first, 0)
    result.generations.append(_summary(0, [ones], result, clock() - gen_started))

    x0 = [min(max(v, lo), hi) for v in first]
    options = {
        "bounds": [lo, hi],
        "popsize": nps.population_size(bands),
        "seed": nps.seed + 1,
        "verbose": -9,
        "maxiter": nps.generations,
    }
    strategy = cma.CMAEvolutionStrategy(x0, nps.sigma0, options)
    stopped = out_of_budget()
    for generation in range(1, nps.generations + 1):
        if stopped:
            break
        gen_started = clock()
        asked = strategy.ask()
        evaluated: list[Evaluated] = []
        for x in asked:
            stopped = out_of_budget()
            if stopped:
                break
            # Plain floats: the reported weights are exactly what the engine is given.
            evaluated.append(evaluate([float(v) for v in x], generation))
        if evaluated:
            result.generations.append(
                _summary(generation, evaluated, result, clock() - gen_started)
            )
        if len(evaluated) < len(asked):
            break  # a budget ran out mid-generation: CMA-ES is told only whole generations
        strategy.tell(asked, [_cost(e) for e in evaluated])
        reasons = strategy.stop()
        if reasons and generation < nps.generations:
            stopped = "cma: " + ", ".join(sorted(str(r) for r in reasons))
            break
    result.stopped = stopped or "generations"
    result.seconds = clock() - started
    return result


def _cost(evaluated: Evaluated) -> float:
    return REJECTED_COST if evaluated.fitness == REJECTED else -evaluated.fitness


def _summary(
    index: int, evaluated: list[Evaluated], result: NpsSearch, seconds: float
) -> GenerationSummary:
    accepted = [e.fitness for e in evaluated if e.fitness != REJECTED]
    best = result.best
    return GenerationSummary(
        index=index,
        best=max(accepted) if accepted else None,
        mean=sum(accepted) / len(accepted) if accepted else None,
        best_so_far=None if best is None else best.fitness,
        evaluations=len(evaluated),
        seconds=seconds,
        build_seconds=sum(e.point.build_seconds for e in evaluated),
        evaluate_seconds=sum(e.point.seconds for e in evaluated),
    )
