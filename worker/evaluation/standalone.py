"""`fapm eval` and the API's evaluation jobs: measure a model the user already has against its
base (no pruning, no output).

The base and the model are each measured once: skill, completion loss, perplexity. With a
fine-tuned reference as well (`finetuned`), the model's skill kept and forgetting left are
relative to it, as for a pruned candidate; without one, the model is its own fine-tune (skill
kept 1, forgetting left 1) and the numbers to read are its skill and its perplexity against the
base's. `note` says so, and says why a measure is undefined (null) when it is.

The sets are tokenized with the measured model's tokenizer. When it has added vocabulary (more
embedding rows than the base), the base is measured with the fine-tune's added rows copied into
its grown embeddings (the `finetuned` reference's, else the model's own: model.py,
`add_vocabulary`), as in an evaluated prune job; a reference with fewer rows than the sets' ids
fails with architecture_mismatch.

`evaluate_model` is the one implementation: the CLI calls it directly, the worker through
`run_evaluation_job` (progress between models, cancellation between batches, the job's report),
so the two give the same numbers for the same inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from worker.engine.pipeline import Progress, ProgressCallback
from worker.engine.tensor_pruner import resolve_device
from worker.errors import JobCancelled
from worker.evaluation.data import load_general, load_task
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
from worker.evaluation.progress import EVALUATE_STAGE
from worker.spec import EvaluationJobSpec, EvaluationSpec

# The stage an evaluation job reports: tensors_done/tensors_total count measured models.
NO_REFERENCE_NOTE = (
    "no finetuned reference was given: skill_kept and forgetting_left are relative to the "
    "model itself (1 by definition); compare its skill and perplexity with the base's"
)


def evaluate_model(
    base: str,
    model: str,
    settings: EvaluationSpec,
    device: str = "auto",
    finetuned: str | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict:
    """The references and the model's point, as the report's "evaluation" section lays them.

    `progress` gets stage "evaluate" events counting the measured models; `should_cancel` is
    asked before each model and between its batches."""
    report_progress = progress or (lambda _p: None)
    cancelled = should_cancel or (lambda: False)
    # The base last: it takes its added vocabulary rows, if any, from the fine-tune.
    models = [(n, u) for n, u in (("model", model), ("finetuned", finetuned), ("base", base)) if u]
    donor_name = "finetuned" if finetuned else "model"
    report_progress(Progress(EVALUATE_STAGE, 0, len(models)))
    dev = resolve_device(device)
    task = load_task(settings.task, settings.max_examples)
    general = load_general(settings.general, settings.max_examples)
    measured: dict[str, tuple[float, float, float, float]] = {}
    evaluator: Evaluator | None = None
    donor: Vocabulary | None = None
    vocabulary_note: str | None = None
    for done, (name, uri) in enumerate(models, start=1):
        if cancelled():
            raise JobCancelled("the job was cancelled")
        loaded: LoadedModel | None = None
        try:
            with local_model_dir(uri, cancelled) as directory:
                loaded = load_causal_lm(directory, dev, uri, with_tokenizer=evaluator is None)
            if evaluator is None:  # the measured model's tokenizer encodes the sets for all
                evaluator = Evaluator(
                    encode_task(loaded.tokenizer, task, loaded.context, settings.task),
                    encode_general(loaded.tokenizer, general, loaded.context, settings.general),
                    settings.batch_size,
                    0,
                    dev,
                    should_cancel=cancelled,
                    tokenizer_of=uri,
                )
            if name == "base" and donor is not None:
                added = add_vocabulary(loaded.model, donor, uri)
                vocabulary_note = added_vocabulary_note(added, finetuned or model)
            donor = None  # the base has what it needs: the donor's weights can go
            if name == donor_name:  # references to its embeddings, kept for the base
                donor = Vocabulary.of(loaded.model)
            started = time.perf_counter()
            skill = evaluator.skill(loaded.model, uri)
            ppl = evaluator.general(loaded.model, uri)
        finally:
            free(loaded)
        measured[name] = (skill.accuracy, skill.loss, ppl.perplexity, time.perf_counter() - started)
        report_progress(Progress(EVALUATE_STAGE, done, len(models)))
    assert evaluator is not None
    ft = measured.get("finetuned", measured["model"])
    ref = Reference(measured["base"][0], ft[0], measured["base"][2], ft[2])

    def point(method: str, values: tuple[float, float, float, float]) -> dict:
        return {
            "method": method,
            "skill": values[0],
            "skill_kept": skill_kept(values[0], ref),
            "completion_loss": values[1],
            "perplexity": values[2],
            "forgetting_left": forgetting_left(values[2], ref),
            "seconds": values[3],
        }

    references = {"base": {**point("base", measured["base"]), "sparsity": 1.0}}
    if "finetuned" in measured:
        references["finetuned"] = {**point("finetuned", measured["finetuned"]), "sparsity": 0.0}
    notes = [
        None if finetuned else NO_REFERENCE_NOTE,
        vocabulary_note,
        ref.skill_note,
        ref.forgetting_note,
    ]
    return {
        "references": references,
        "points": [{**point("model", measured["model"]), "sparsity": None}],
        "relative_to": "finetuned" if finetuned else "model",
        "note": "; ".join(n for n in notes if n) or None,
        "tokens_per_second": evaluator.throughput.tokens_per_second,
        "device": dev.type,
        "uris": {"base": base, "model": model, "finetuned": finetuned},
    }


def run_evaluation_job(
    spec: EvaluationJobSpec,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    job_id: str | None = None,
) -> dict:
    """An evaluation job's report: the spec and `evaluate_model`'s section. Nothing is written
    anywhere, so a re-delivered job simply measures again."""
    started = time.perf_counter()
    evaluation = evaluate_model(
        spec.base,
        spec.model,
        spec.evaluate,
        spec.device,
        spec.finetuned,
        progress=progress,
        should_cancel=should_cancel,
    )
    if progress is not None:
        progress(Progress("done"))
    return {
        "job_id": job_id,
        "kind": "evaluation",
        "spec": spec.model_dump(mode="json"),
        "evaluation": evaluation,
        "seconds": {"total": time.perf_counter() - started},
    }


__all__ = ["evaluate_model", "run_evaluation_job"]
