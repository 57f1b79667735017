"""`fapm eval`: measure a model the user already has against its base (no pruning, no output).

The base and the model are each measured once: skill, completion loss, perplexity. With a
fine-tuned reference as well (`finetuned`), the model's skill kept and forgetting left are
relative to it, as for a pruned candidate; without one, the model is its own fine-tune (skill
kept 1, forgetting left 1) and the numbers to read are its skill and its perplexity against the
base's.
"""

from __future__ import annotations

import time

from worker.engine.tensor_pruner import resolve_device
from worker.evaluation.data import load_general, load_task
from worker.evaluation.measures import Reference, forgetting_left, skill_kept
from worker.evaluation.metrics import Evaluator, encode_general, encode_task
from worker.evaluation.model import free, load_causal_lm, local_model_dir
from worker.spec import EvaluationSpec


def evaluate_model(
    base: str,
    model: str,
    settings: EvaluationSpec,
    device: str = "auto",
    finetuned: str | None = None,
) -> dict:
    """The references and the model's point, as the report's "evaluation" section lays them."""
    dev = resolve_device(device)
    task = load_task(settings.task, settings.max_examples)
    general = load_general(settings.general, settings.max_examples)
    measured: dict[str, tuple[float, float, float, float]] = {}
    evaluator: Evaluator | None = None
    for name, uri in (("model", model), ("base", base), ("finetuned", finetuned)):
        if uri is None:
            continue
        with local_model_dir(uri) as directory:
            loaded = load_causal_lm(directory, dev, uri, with_tokenizer=evaluator is None)
        if evaluator is None:  # the measured model's tokenizer encodes the sets for all
            evaluator = Evaluator(
                encode_task(loaded.tokenizer, task, loaded.context, settings.task),
                encode_general(loaded.tokenizer, general, loaded.context, settings.general),
                settings.batch_size,
                0,
                dev,
            )
        started = time.perf_counter()
        skill, ppl = evaluator.skill(loaded.model), evaluator.general(loaded.model)
        measured[name] = (skill.accuracy, skill.loss, ppl.perplexity, time.perf_counter() - started)
        free(loaded)
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
    return {
        "references": references,
        "points": [{**point("model", measured["model"]), "sparsity": None}],
        "note": ref.forgetting_note,
        "tokens_per_second": evaluator.throughput.tokens_per_second,
        "device": dev.type,
        "uris": {"base": base, "model": model, "finetuned": finetuned},
    }


__all__ = ["evaluate_model"]
