"""An evaluated job: measure the base and the fine-tune, evaluate candidates in memory, then
publish the chosen (or the requested) sparsity with the engine.

`run_job_spec` is what the worker and `fapm prune` call: plain specs go straight to `run_prune`;
specs with `evaluate` (and sparsity "auto") come here first. The published bytes are always
`run_prune`'s own at the chosen method and sparsity, so an auto job's output equals a plain job's
at that setting; the evaluation adds pruning_report.json's "evaluation" section, the plot
(evaluation.png/.svg) and a card section.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from worker.engine.pipeline import (
    ProgressCallback,
    PruneResult,
    published_result,
    run_prune,
)
from worker.engine.tensor_pruner import resolve_device
from worker.evaluation.candidates import CandidateBuilder
from worker.evaluation.data import load_general, load_task
from worker.evaluation.errors import (
    NoAcceptableCandidate,
    SkillFloorUnreachable,
    SkillUndefined,
)
from worker.evaluation.measures import Reference, forgetting_left, skill_kept
from worker.evaluation.metrics import Evaluator, encode_general, encode_task
from worker.evaluation.model import (
    LoadedModel,
    Vocabulary,
    add_vocabulary,
    added_vocabulary_note,
    free,
    load_causal_lm,
    local_model_dir,
)
from worker.evaluation.nps_search import NpsSearch, evaluation_budget, run_search
from worker.evaluation.plot import write_plot, write_search_plot
from worker.evaluation.progress import EvaluateProgress
from worker.evaluation.search import (
    Point,
    choose,
    evaluations_per_method,
    meets,
    search_method,
)
from worker.io.publish import open_target
from worker.io.strict_json import with_finite_note
from worker.spec import JobSpec
from worker.spec.nps import band_edges

NO_GENERAL_NOTE = (
    "no general set was given (nps objective skill): perplexity and forgetting_left were not "
    "measured"
)


@dataclass
class Evaluation:
    """What an evaluated job measured (the report's "evaluation" section)."""

    references: dict[str, Point]
    points: list[Point]
    chosen: Point | None
    floor: float | None
    note: str | None
    tokens_per_second: float
    seconds: dict[str, float]
    requested: dict
    candidates: dict  # CandidateBuilder.memory(): the mode used and what it held
    evaluations: int = 0  # models measured: the references and every candidate
    nps: NpsSearch | None = None  # an NPS search: what it tried and chose
    # The published spec's fields that the evaluation decided beyond method and sparsity (a
    # merge's NPS search: its inputs' nps_weights and lam); None: method and sparsity only.
    published: dict | None = None

    def as_dict(self) -> dict:
        nps = {} if self.nps is None else {"nps": self.nps.as_dict()}
        return nps | {
            "requested": self.requested,
            "floor": self.floor,
            "references": {k: v.as_dict() for k, v in self.references.items()},
            "points": [p.as_dict() for p in self.points],
            "chosen": None if self.chosen is None else self.chosen.as_dict(),
            "note": self.note,
            "evaluations": self.evaluations,
            "tokens_per_second": self.tokens_per_second,
            "seconds": self.seconds,
            "candidates": self.candidates,
        }


def run_job_spec(
    spec: JobSpec,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    job_id: str | None = None,
) -> PruneResult:
    """Run any job: weight pruning through its engine (worker/compress/), a sparse delta's
    materialization through worker/engine/materialize.py, evaluated task-vector jobs through the
    evaluation, the rest through run_prune."""
    if spec.materialize is not None:
        from worker.engine.materialize import run_materialize

        return run_materialize(spec, progress, should_cancel, job_id)
    if spec.prune == "weights":
        from worker.compress.pipeline import run_compress

        return run_compress(spec, progress, should_cancel, job_id)
    if spec.evaluate is None:
        return run_prune(spec, progress, should_cancel, job_id)
    return run_evaluated(spec, progress, should_cancel, job_id)


def run_evaluated(
    spec: JobSpec,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    job_id: str | None = None,
) -> PruneResult:
    report_progress = progress or (lambda _p: None)
    cancelled = should_cancel or (lambda: False)
    published = published_result(spec, job_id, report_progress)
    if published is not None:  # a re-run of a job that published before its worker died
        return published
    # An output that is there already fails now, not after minutes of evaluation.
    open_target(spec.output, spec.overwrite, job_id).abort()

    evaluation = evaluate_job(spec, report_progress, cancelled)
    if evaluation.chosen is None and evaluation.floor is None:  # an NPS search, no floor
        raise NoAcceptableCandidate(
            f"the NPS search rejected all {len(evaluation.points)} candidates (perplexity not "
            "finite); nothing was published",
            report=with_finite_note({"evaluation": evaluation.as_dict()}),
        )
    if evaluation.chosen is None:
        raise SkillFloorUnreachable(
            f"no candidate kept {evaluation.floor:g} of the fine-tune's skill "
            f"({len(evaluation.points)} evaluated; the best kept "
            f"{max((p.skill_kept or 0.0) for p in evaluation.points):.3g}); nothing was published",
            # Strict JSON: a candidate whose perplexity overflowed is a noted null, not NaN.
            report=with_finite_note({"evaluation": evaluation.as_dict()}),
        )
    chosen = evaluation.chosen
    concrete = JobSpec.model_validate(
        {
            **spec.model_dump(),
            "method": chosen.method,
            "sparsity": chosen.sparsity,
            "target": None,
            "methods": None,
            # NPS publishes exactly the weights it reports (ALGORITHMS.md "NPS").
            "nps": _published_nps(spec, evaluation),
            **(evaluation.published or {}),
        }
    )
    section = evaluation.as_dict()

    def extra_files(directory: Path) -> dict:
        files = write_plot(
            directory,
            section["points"],
            section["references"],
            section["chosen"],
            section["floor"],
        )
        if evaluation.nps is not None:
            files += write_search_plot(directory, section["nps"])
        card = directory / "README.md"
        card.write_text(card.read_text() + card_section(evaluation, files[0]))
        return {"evaluation": {**section, "plots": files}}

    return run_prune(concrete, report_progress, cancelled, job_id, extra_files=extra_files)


def _published_nps(spec: JobSpec, evaluation: Evaluation) -> dict | None:
    """The NPS section of the published job: exactly the weights of the chosen candidate."""
    chosen = evaluation.chosen
    assert chosen is not None
    if spec.merge_inputs is not None:  # weights are the inputs' (evaluation.published)
        return None if spec.nps is None else spec.nps.model_dump()
    if chosen.method != "nps":
        return None
    nps = spec.nps_settings
    search = evaluation.nps
    if search is not None and search.best is not None and chosen is search.best.point:
        weights = search.best.weights
    else:  # a fixed-weights job, or an all-ones point of sparsity "auto"
        bands = len(band_edges(chosen.sparsity, nps)) - 1
        weights = nps.weights or [1.0] * bands
    return {**nps.model_dump(), "weights": weights}


def _first_sparsity_losing_the_floor(points: list[Point]) -> float | None:
    """The lowest evaluated sparsity above every one that keeps the floor and that does not
    keep it itself (where the bisection ended), or None when none keeps it or all do."""
    keeping = [p.sparsity for p in points if p.meets_floor]
    if not keeping:
        return None
    above = [p.sparsity for p in points if not p.meets_floor and p.sparsity > max(keeping)]
    return min(above, default=None)


def evaluate_job(
    spec: JobSpec, report_progress: ProgressCallback, cancelled: Callable[[], bool]
) -> Evaluation:
    """Measure the references and the candidates; choose (sparsity "auto") or report the one
    requested sparsity. The models are freed, and the local copies of remote inputs removed,
    however it ends (a worker runs many jobs)."""
    loaded: list[LoadedModel] = []
    with ExitStack() as local_dirs:
        try:
            if spec.merge_inputs is not None:  # each input on its own task set
                from worker.evaluation.merge_job import evaluate_merge

                return evaluate_merge(spec, report_progress, cancelled, loaded, local_dirs)
            return _evaluate(spec, report_progress, cancelled, loaded, local_dirs)
        finally:
            for model in loaded:
                free(model)


def _evaluate(
    spec: JobSpec,
    report_progress: ProgressCallback,
    cancelled: Callable[[], bool],
    loaded: list[LoadedModel],
    local_dirs: ExitStack,
) -> Evaluation:
    assert spec.evaluate is not None
    settings = spec.evaluate
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    methods = spec.search_methods if spec.auto else [spec.method]
    if spec.searched:
        edges = band_edges(spec.sparsity, spec.nps_settings)  # type: ignore[arg-type]
        candidates_planned = evaluation_budget(spec.nps_settings, len(edges) - 1)
    elif spec.auto:
        candidates_planned = len(methods) * evaluations_per_method()
        if "nps" in methods:  # and one search at the edge of the floor
            candidates_planned += evaluation_budget(spec.nps_settings, spec.nps_settings.bands)
    else:
        candidates_planned = 1
    progress = EvaluateProgress(report_progress, cancelled, 2 + candidates_planned)
    tick = progress.tick
    device = resolve_device(spec.device)
    task = load_task(settings.task, settings.max_examples)
    # Only an NPS search on skill alone runs without a general set (the spec checks it).
    general = load_general(settings.general, settings.max_examples) if settings.general else []
    # The work model: built from the fine-tune's directory (its tokenizer and shapes), or the
    # base's for an adapter; candidates are written into its parameters.
    # Remote inputs are copied to local directories, kept until the evaluation ends: the
    # candidate builder then reads W and F from them as maps of the page cache, not as copies in
    # the process's memory.
    work_uri = spec.finetuned or spec.base
    work_dir = local_dirs.enter_context(local_model_dir(work_uri, cancelled))
    work = load_causal_lm(work_dir, device, work_uri)
    loaded.append(work)
    evaluator = Evaluator(
        encode_task(work.tokenizer, task, work.context, settings.task),
        encode_general(work.tokenizer, general, work.context, settings.general)
        if settings.general
        else [],
        settings.batch_size,
        pad_id(work.tokenizer),
        device,
        should_cancel=cancelled,
        tokenizer_of=work_uri,
    )
    seconds["load"] = time.perf_counter() - started

    # The sets are tokenized by the fine-tune's tokenizer, so with added vocabulary they may hold
    # ids the base has no row for. The base is measured with the fine-tune's added rows (taken
    # from the work model, which holds the fine-tune's weights until the builder writes into it):
    # every candidate has those rows too (model.py, add_vocabulary).
    base_dir = (
        work_dir
        if spec.base == work_uri
        else local_dirs.enter_context(local_model_dir(spec.base, cancelled))
    )
    base_model = load_causal_lm(base_dir, device, spec.base, with_tokenizer=False)
    loaded.append(base_model)
    added = add_vocabulary(base_model.model, Vocabulary.of(work.model), spec.base)
    base_scores = _measure(evaluator, base_model.model, spec.base)
    free(base_model)
    tick()
    local_inputs = {"base": str(base_dir)} | (
        {"finetuned": str(work_dir)} if spec.finetuned else {}
    )
    builder = CandidateBuilder(spec.model_copy(update=local_inputs), work.model, device, cancelled)
    builder.write_finetuned()
    ft_scores = _measure(evaluator, work.model, work_uri)
    tick()
    ref = Reference(base_scores[0], ft_scores[0], base_scores[2], ft_scores[2])
    if spec.auto:
        floor: float | None = spec.target.min_skill_kept if spec.target else 0.95
    else:  # an NPS search rejects candidates below a floor only when one is given
        floor = spec.target.min_skill_kept if spec.target and spec.searched else None

    def point(method: str, sparsity: float, scores, build: float) -> Point:
        kept = skill_kept(scores[0], ref)
        return Point(
            method=method,
            sparsity=sparsity,
            skill=scores[0],
            skill_kept=kept,
            completion_loss=scores[1],
            perplexity=scores[2],
            forgetting_left=forgetting_left(scores[2], ref),
            meets_floor=meets(kept, floor) if floor is not None else False,
            seconds=scores[3],
            build_seconds=build,
        )

    references = {
        "base": point("base", 1.0, base_scores, 0.0),
        "finetuned": point("finetuned", 0.0, ft_scores, 0.0),
    }
    if (spec.auto or spec.searched) and ref.skill_ft <= 0:
        raise SkillUndefined(
            "the fine-tuned model scores 0 on the task set, so no skill can be kept: check the "
            "task set's format against the fine-tune (prompt + completion, exact match)"
        )

    def measure(method: str, sparsity: float, weights: list[float] | None = None) -> Point:
        if method == "nps":
            nps = spec.nps_settings
            weights = weights or nps.weights or [1.0] * (len(band_edges(sparsity, nps)) - 1)
            build = builder.write_nps(sparsity, weights, nps.lam)
        else:
            build = builder.write(method, sparsity)
        where = f"the {method} candidate at sparsity {sparsity:g}"
        result = point(method, sparsity, _measure(evaluator, work.model, where), build)
        tick()
        return result

    def search_weights(sparsity: float) -> NpsSearch:
        nps = spec.nps_settings
        edges = band_edges(sparsity, nps)
        return run_search(
            nps,
            sparsity,
            edges,
            lambda weights: measure("nps", sparsity, weights),
            len(evaluator.task_set),
            floor,
        )

    search: NpsSearch | None = None
    if spec.searched:
        assert isinstance(spec.sparsity, float)
        search = search_weights(spec.sparsity)
        best = search.best
        # The all-ones candidate is magnitude at this sparsity (ALGORITHMS.md): plotted as such.
        points = [replace(search.magnitude.point, method="magnitude")]
        chosen = None if best is None else best.point
        if chosen is not None:
            points.append(chosen)
    elif spec.auto:
        points = []
        for method in methods:
            found = search_method(method, measure)
            points += found
            edge = _first_sparsity_losing_the_floor(found) if method == "nps" else None
            if edge is not None:
                # Where the all-ones order (magnitude's) loses the floor, NPS searches weights
                # that keep it; its best point competes with every other.
                search = search_weights(edge)
                if search.best is not None:
                    points.append(search.best.point)
        chosen = choose(points)
    else:
        assert isinstance(spec.sparsity, float)
        points = [measure(spec.method, spec.sparsity)]
        chosen = points[0]
    seconds["rank"] = sum(builder.rank_seconds.values())
    seconds["total"] = time.perf_counter() - started
    return Evaluation(
        references=references,
        points=points,
        chosen=chosen,
        floor=floor,
        note="; ".join(
            n
            for n in (
                added_vocabulary_note(added, work_uri),
                ref.forgetting_note if settings.general else NO_GENERAL_NOTE,
            )
            if n
        )
        or None,
        tokens_per_second=evaluator.throughput.tokens_per_second,
        seconds=seconds,
        requested={
            "sparsity": spec.sparsity,
            "methods": methods,
            "target": spec.target.model_dump() if spec.target else None,
            "evaluate": settings.model_dump(),
            "device": device.type,
        },
        candidates=builder.memory(),
        evaluations=progress.done,
        nps=search,
    )


def pad_id(tokenizer) -> int:
    # Padded positions are masked out and never scored: any valid id works.
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if isinstance(value, int):
            return value
    return 0


def _measure(
    evaluator: Evaluator, model: torch.nn.Module, where: str
) -> tuple[float, float, float, float]:
    """(skill, completion loss, perplexity, seconds) of one model."""
    started = time.perf_counter()
    skill = evaluator.skill(model, where)
    # No general set (NPS on skill alone): perplexity is not measured.
    ppl = evaluator.general(model, where).perplexity if evaluator.general_set else math.nan
    return skill.accuracy, skill.loss, ppl, time.perf_counter() - started


def _fmt(value: float | None, digits: int = 3) -> str:
    return "undefined" if value is None else f"{value:.{digits}f}"


def card_section(evaluation: Evaluation, png: str) -> str:
    """The model card's evaluation section: the plot and every measured point."""
    chosen = evaluation.chosen
    assert chosen is not None
    requested = evaluation.requested
    tasks = requested.get("tasks")  # a merge: each input's own task set
    on = (
        "each input's task set (" + ", ".join(f"`{t['task']}`" for t in tasks) + ")"
        if tasks
        else f"`{requested['evaluate']['task']}`"
    )
    lines = [
        "",
        "## Evaluation",
        "",
        f"Measured by fapm-service on {on} (skill: exact match of the greedy completion)"
        + (
            f" and `{requested['evaluate']['general']}` (perplexity)."
            if requested["evaluate"]["general"]
            else "; no general set (perplexity not measured)."
        ),
    ]
    if requested["sparsity"] == "auto":
        whose = (
            "the fine-tunes' skill (the mean over their tasks)"
            if tasks
            else "the fine-tune's skill"
        )
        lines.append(
            f"Sparsity was searched (methods: {', '.join(requested['methods'])}): the least "
            f"forgetting that keeps {evaluation.floor:g} of {whose} is "
            f"**{chosen.method} at sparsity {chosen.sparsity:g}**."
        )
    if evaluation.nps is not None and evaluation.nps.best is not None:
        lines += nps_card_lines(evaluation.nps)
    if evaluation.note:
        lines.append(f"Note: {evaluation.note}.")
    lines += [
        "",
        f"![skill kept vs forgetting left]({png})",
        "",
        "| model | sparsity | skill | skill kept | completion loss | perplexity | forgetting left |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [*evaluation.references.values(), *evaluation.points]
    for p in rows:
        mark = " (chosen)" if p is chosen else ""
        lines.append(
            f"| {p.method}{mark} | {p.sparsity:g} | {p.skill:.3f} | {_fmt(p.skill_kept)} | "
            f"{p.completion_loss:.4f} | {p.perplexity:.4f} | {_fmt(p.forgetting_left)} |"
        )
    if tasks:
        from worker.evaluation.merge_job import merge_card_lines

        lines += merge_card_lines(evaluation)
    return "\n".join(lines) + "\n"


def nps_card_lines(search: NpsSearch) -> list[str]:
    """What the NPS search tried and chose, for the card."""
    best = search.best
    assert best is not None
    magnitude = search.magnitude.fitness
    gain = (
        "" if magnitude == float("-inf") else f" (magnitude at the same sparsity: {magnitude:.4f})"
    )
    weights = ", ".join(f"{w:.4g}" for w in best.weights)
    edges = ", ".join(f"{e:.4g}" for e in search.edges)
    if search.merge is not None:  # a merge: every nps input's weights and the merge's lam
        parts = "; ".join(
            f"input {part['input']}: bands {', '.join(f'{e:.4g}' for e in part['band_edges'])}, "
            f"weights {', '.join(f'{w:.4g}' for w in part['weights'])}"
            for part in search.merge["inputs"]
        )
        return [
            "",
            f"The band weights of every nps input and the merge's lambda were searched by NPS "
            f"(arXiv 2505.18713; CMA-ES, {len(search.evaluated)} evaluations) with objective "
            f"**{search.objective}** on the mean skill kept over the inputs' tasks: fitness "
            f"{best.fitness:.4f}{gain}.",
            f"Chosen: {parts}; merge lambda {search.merge['lam']:.4g}. Fitness per generation: "
            "`nps_search.png`.",
        ]
    return [
        "",
        f"The task vector's band weights were searched by NPS (arXiv 2505.18713; CMA-ES, "
        f"{len(search.evaluated)} evaluations in {len(search.generations) - 1} generations, "
        f"stopped by {search.stopped}) with objective **{search.objective}**: fitness "
        f"{best.fitness:.4f}{gain}.",
        f"Bands (rank fractions of |update|): {edges}; chosen weights: {weights}; "
        f"lam {search.lam:g}. Fitness per generation: `nps_search.png`.",
    ]
