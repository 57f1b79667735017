"""An evaluated merge: each fine-tune's skill on its own task set, kept by the merge.

References: the base (on every input's task set and the general set) and each fine-tune i (on
its own task set, skill_i(ft_i), and the general set). A candidate, the merge at one (method,
sparsity) written by the merge engine itself (merge_candidates.py), is measured on every task
set and the general set:

    skill_kept      = mean_i skill_i(merged) / skill_i(ft_i)        (each ratio in `tasks`)
    forgetting_left = (ppl(merged) - ppl(base)) / (mean_i ppl(ft_i) - ppl(base))

so 1 is "as good as each fine-tune at its own task" and "as much forgetting as the fine-tunes on
average". The references are "base", "finetuned" (the fine-tunes' means: skill kept 1,
forgetting left 1) and "finetuned[i]" for each input. sparsity "auto" searches as a single pair
does (search.py), the floor on the mean skill kept; the candidate sparsity and method go to the
inputs that name none of their own.

method "nps" on a merge (the job's or an input's, at a fixed sparsity, without nps_weights): one
CMA-ES search (nps_search.py) over a vector of every nps input's band weights (the bands at its
own sparsity) and then the merge's lam, starting from all ones and the merge's lam (each nps input
in magnitude's order); the fitness is the mean skill kept (objective "skill") or its harmonic mean
with 1 - forgetting left ("balanced"). The published job carries the best vector as each input's
nps_weights and merge.lam. Every model is measured on the sets as the first input's
tokenizer (the base's, for an adapter) encodes them: the published merge carries that tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from statistics import fmean

import torch

from worker.engine.pipeline import ProgressCallback
from worker.engine.tensor_pruner import resolve_device
from worker.evaluation.data import load_general, load_task
from worker.evaluation.errors import SkillUndefined
from worker.evaluation.measures import Reference, forgetting_left
from worker.evaluation.merge_candidates import write_input, write_merged
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
from worker.evaluation.progress import EvaluateProgress
from worker.evaluation.search import Point, choose, evaluations_per_method, meets, search_method
from worker.spec import JobSpec
from worker.spec.nps import band_edges

MERGE_NOTE = (
    "a merge: skill_kept is the mean over the inputs of skill on its task set / the fine-tune's; "
    "forgetting_left is relative to the base and the fine-tunes' mean perplexity"
)


@dataclass(frozen=True)
class _Scores:
    """One model's numbers: (skill, completion loss) per task set measured, and perplexity."""

    tasks: dict[int, tuple[float, float]]
    perplexity: float
    seconds: float


def evaluate_merge(
    spec: JobSpec,
    report_progress: ProgressCallback,
    cancelled: Callable[[], bool],
    loaded: list[LoadedModel],
    local_dirs: ExitStack,
):  # -> job.Evaluation (imported here: job.py imports this module)
    from worker.evaluation.job import Evaluation, pad_id

    inputs = spec.merge_inputs
    settings = spec.evaluate
    assert inputs and settings is not None and settings.general is not None
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    methods = spec.search_methods if spec.auto else [spec.method]
    layout = nps_layout(spec) if spec.searched else []
    if spec.searched:
        candidates_planned = evaluation_budget(spec.nps_settings, searched_length(layout))
    elif spec.auto:
        candidates_planned = len(methods) * evaluations_per_method()
    else:
        candidates_planned = 1
    progress = EvaluateProgress(report_progress, cancelled, 1 + len(inputs) + candidates_planned)
    tick = progress.tick
    device = resolve_device(spec.device)
    task_sets = [load_task(item.task or "", settings.max_examples) for item in inputs]
    general = load_general(settings.general, settings.max_examples)
    # Remote inputs are copied to local directories for the evaluation (every candidate reads
    # every input again); local ones are read in place.
    base_dir = local_dirs.enter_context(local_model_dir(spec.base or "", cancelled))
    input_dirs = [local_dirs.enter_context(local_model_dir(i.model, cancelled)) for i in inputs]
    local = spec.model_copy(
        update={
            "base": str(base_dir),
            "device": device.type,
            "finetuned": [
                item.model_copy(update={"model": str(d)})
                for item, d in zip(inputs, input_dirs, strict=True)
            ],
        }
    )
    # The work model: the first input's directory (its tokenizer and side files are the merge's),
    # the base's for an adapter; every model measured is written into its parameters.
    work_uri = spec.base or "" if inputs[0].adapter else inputs[0].model
    work_dir = base_dir if inputs[0].adapter else input_dirs[0]
    work = load_causal_lm(work_dir, device, work_uri)
    loaded.append(work)
    general_ids = encode_general(work.tokenizer, general, work.context, settings.general)
    evaluators = [
        Evaluator(
            encode_task(work.tokenizer, task_set, work.context, item.task or ""),
            general_ids if i == 0 else [],  # the general set is measured once per model
            settings.batch_size,
            pad_id(work.tokenizer),
            device,
            should_cancel=cancelled,
            tokenizer_of=work_uri,
        )
        for i, (item, task_set) in enumerate(zip(inputs, task_sets, strict=True))
    ]
    every_task = range(len(inputs))

    def measure(model: torch.nn.Module, where: str, which) -> _Scores:
        began = time.perf_counter()
        tasks = {}
        for i in which:
            score = evaluators[i].skill(model, where)
            tasks[i] = (score.accuracy, score.loss)
        perplexity = evaluators[0].general(model, where).perplexity
        return _Scores(tasks, perplexity, time.perf_counter() - began)

    seconds["load"] = time.perf_counter() - started
    base_model = load_causal_lm(base_dir, device, spec.base or "", with_tokenizer=False)
    loaded.append(base_model)
    added = add_vocabulary(base_model.model, Vocabulary.of(work.model), spec.base or "")
    base_scores = measure(base_model.model, spec.base or "", every_task)
    free(base_model)
    tick()
    own: list[_Scores] = []
    for i, item in enumerate(inputs):
        write_input(local, i, work.model, device, cancelled)
        own.append(measure(work.model, item.model, [i]))
        tick()
    skill_ft = [own[i].tasks[i][0] for i in every_task]
    ref = Reference(
        fmean(base_scores.tasks[i][0] for i in every_task),
        fmean(skill_ft),
        base_scores.perplexity,
        fmean(s.perplexity for s in own),
    )
    if spec.auto:
        floor: float | None = spec.target.min_skill_kept if spec.target else 0.95
    else:  # an NPS search rejects candidates below a floor only when one is given
        floor = spec.target.min_skill_kept if spec.target and spec.searched else None

    def point(method: str, sparsity: float, scores: _Scores, build: float) -> Point:
        rows = []
        for i, (skill, loss) in scores.tasks.items():
            rows.append(
                {
                    "input": i,
                    "model": inputs[i].model,
                    "task": inputs[i].task,
                    "skill": skill,
                    "skill_kept": skill / skill_ft[i] if skill_ft[i] > 0 else None,
                    "completion_loss": loss,
                }
            )
        ratios = [r["skill_kept"] for r in rows]
        kept = None if None in ratios else fmean(ratios)
        return Point(
            method=method,
            sparsity=sparsity,
            skill=fmean(r["skill"] for r in rows),
            skill_kept=kept,
            completion_loss=fmean(r["completion_loss"] for r in rows),
            perplexity=scores.perplexity,
            forgetting_left=forgetting_left(scores.perplexity, ref),
            meets_floor=meets(kept, floor) if floor is not None else False,
            seconds=scores.seconds,
            build_seconds=build,
            tasks=tuple(rows),
        )

    each = [point(f"finetuned[{i}]", 0.0, own[i], 0.0) for i in every_task]
    mean_ft = Point(
        method="finetuned",
        sparsity=0.0,
        skill=ref.skill_ft,
        skill_kept=1.0 if min(skill_ft) > 0 else None,
        completion_loss=fmean(p.completion_loss for p in each),
        perplexity=ref.ppl_ft,
        forgetting_left=forgetting_left(ref.ppl_ft, ref),
        meets_floor=False,
        seconds=sum(p.seconds for p in each),
        build_seconds=0.0,
        tasks=tuple(p.tasks[0] for p in each if p.tasks),
    )
    references = {
        "base": point("base", 1.0, base_scores, 0.0),
        "finetuned": mean_ft,
        **{f"finetuned[{i}]": p for i, p in enumerate(each)},
    }
    if spec.auto and min(skill_ft) <= 0:
        zero = skill_ft.index(min(skill_ft))
        raise SkillUndefined(
            f"finetuned[{zero}] ({inputs[zero].model}) scores 0 on its task set "
            f"({inputs[zero].task}), so no skill can be kept: check the task set's format "
            "against the fine-tune (prompt + completion, exact match)"
        )

    def measure_candidate(method: str, sparsity: float, merge: JobSpec = local) -> Point:
        build = write_merged(merge, work.model, method, sparsity, cancelled)
        where = f"the merge with {method} at sparsity {sparsity:g}"
        result = point(method, sparsity, measure(work.model, where, every_task), build)
        tick()
        return result

    search: NpsSearch | None = None
    published: dict | None = None
    if spec.searched:
        assert isinstance(spec.sparsity, float)
        sparsity = spec.sparsity
        search = run_search(
            spec.nps_settings,
            sparsity,
            layout[0][1],
            lambda x: measure_candidate("nps", sparsity, with_searched(local, layout, x)),
            len(inputs) * max(len(e.task_set) for e in evaluators),
            floor,
            start=[1.0] * (searched_length(layout) - 1) + [spec.merge_settings.lam],
        )
        # The start (each nps input's weights all 1: magnitude's order) is plotted as magnitude.
        points = [replace(search.magnitude.point, method="magnitude")]
        chosen = None if search.best is None else search.best.point
        if search.best is not None:
            points.append(search.best.point)
            search.merge = searched_parts(layout, search.best.weights)
            published = published_search(spec, layout, search.best.weights)
    elif spec.auto:
        points = [p for method in methods for p in search_method(method, measure_candidate)]
        chosen = choose(points)
    else:
        assert isinstance(spec.sparsity, float)
        points = [measure_candidate(spec.method, spec.sparsity)]
        chosen = points[0]
    seconds["total"] = time.perf_counter() - started
    tokens = sum(e.throughput.tokens for e in evaluators)
    spent = sum(e.throughput.seconds for e in evaluators)
    notes = (added_vocabulary_note(added, work_uri), ref.forgetting_note, MERGE_NOTE)
    return Evaluation(
        references=references,
        points=points,
        chosen=chosen,
        floor=floor,
        note="; ".join(n for n in notes if n),
        tokens_per_second=tokens / spent if spent else 0.0,
        seconds=seconds,
        requested={
            "sparsity": spec.sparsity,
            "methods": methods,
            "target": spec.target.model_dump() if spec.target else None,
            "evaluate": settings.model_dump(),
            "tasks": [{"model": item.model, "task": item.task} for item in inputs],
            "device": device.type,
        },
        # No ranks or copies held: each candidate is the merge engine reading every input.
        candidates={"mode": "merge", "input_reads_per_candidate": len(inputs)},
        evaluations=progress.done,
        nps=search,
        published=published,
    )


def nps_layout(spec: JobSpec) -> list[tuple[int, list[float]]]:
    """(input index, band edges at its sparsity) of each input a merge's NPS search weighs."""
    inputs = spec.merge_inputs or []
    return [
        (i, band_edges(spec.input_sparsity(item), spec.nps_settings))
        for i, item in enumerate(inputs)
        if spec.input_method(item) == "nps"
    ]


def searched_length(layout: list[tuple[int, list[float]]]) -> int:
    """The searched vector: every nps input's band weights, then the merge's lam."""
    return sum(len(edges) - 1 for _i, edges in layout) + 1


def _split(
    layout: list[tuple[int, list[float]]], x: list[float]
) -> tuple[dict[int, list[float]], float]:
    weights, at = {}, 0
    for i, edges in layout:
        weights[i] = list(x[at : at + len(edges) - 1])
        at += len(edges) - 1
    return weights, x[at]


def with_searched(spec: JobSpec, layout: list[tuple[int, list[float]]], x: list[float]) -> JobSpec:
    """The merge with the searched vector `x`: each nps input's weights and the merge's lam."""
    weights, lam = _split(layout, x)
    return spec.model_copy(
        update={
            "finetuned": [
                item.model_copy(update={"nps_weights": weights.get(i)})
                for i, item in enumerate(spec.merge_inputs or [])
            ],
            "merge": spec.merge_settings.model_copy(update={"lam": lam}),
        }
    )


def searched_parts(layout: list[tuple[int, list[float]]], x: list[float]) -> dict:
    """The report's nps "merge" entry: whose weights are which."""
    weights, lam = _split(layout, x)
    return {
        "inputs": [{"input": i, "band_edges": edges, "weights": weights[i]} for i, edges in layout],
        "lam": lam,
    }


def published_search(spec: JobSpec, layout: list[tuple[int, list[float]]], x: list[float]) -> dict:
    """What the published job takes from the search: the inputs' nps_weights and the merge's
    lam; the job's method stays (an input may be the only one pruned by nps)."""
    chosen = with_searched(spec, layout, x)
    return {
        "method": spec.method,
        "nps": None if spec.nps is None else spec.nps.model_dump(),
        "finetuned": [item.model_dump() for item in chosen.merge_inputs or []],
        "merge": chosen.merge_settings.model_dump(),
    }


def merge_card_lines(evaluation) -> list[str]:
    """The card's per-task table of a merge: each input's task and its skill in every model."""
    requested = evaluation.requested
    lines = [
        "",
        "Skill kept per task (skill on the input's task set / that fine-tune's own skill on it):",
        "",
        "| model | sparsity | "
        + " | ".join(f"`{t['task']}` ({t['model']})" for t in requested["tasks"])
        + " |",
        "| --- | --- |" + " --- |" * len(requested["tasks"]),
    ]
    for p in [*evaluation.references.values(), *evaluation.points]:
        by_input = {row["input"]: row for row in p.tasks or ()}
        cells = []
        for i in range(len(requested["tasks"])):
            row = by_input.get(i)
            kept = None if row is None else row["skill_kept"]
            cells.append("" if row is None else f"{row['skill']:.3f} ({_ratio(kept)})")
        mark = " (chosen)" if p is evaluation.chosen else ""
        lines.append(f"| {p.method}{mark} | {p.sparsity:g} | " + " | ".join(cells) + " |")
    return lines


def _ratio(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"
