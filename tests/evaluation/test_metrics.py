"""The evaluation numbers against a plain reference: one example at a time, real greedy
generation token by token, float64 model, no padding, no batching, no shared code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.eval_models import write_jsonl
from worker.evaluation.data import load_general, load_task
from worker.evaluation.errors import EvalDataError
from worker.evaluation.measures import Reference, forgetting_left, skill_kept
from worker.evaluation.metrics import Evaluator, encode_general, encode_task
from worker.evaluation.model import load_causal_lm

CPU = torch.device("cpu")


def reference_scores(model_dir: Path, task: Path, general: Path) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    correct, nll, count = 0, 0.0, 0
    rows = [json.loads(line) for line in task.read_text().splitlines()]
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion = tokenizer(row["prompt"] + row["completion"])["input_ids"][len(prompt) :]
        generated = list(prompt)
        for _ in completion:  # greedy generation, recomputed from scratch each step
            with torch.no_grad():
                logits = model(torch.tensor([generated])).logits[0, -1]
            generated.append(int(logits.argmax()))
        correct += generated[len(prompt) :] == completion
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0]
        for j, token in enumerate(completion):
            nll -= float(logits[len(prompt) - 1 + j].log_softmax(-1)[token])
            count += 1
    ppl_nll, predicted = 0.0, 0
    for line in general.read_text().splitlines():
        ids = tokenizer(json.loads(line)["text"])["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        for j in range(1, len(ids)):
            ppl_nll -= float(logits[j - 1].log_softmax(-1)[ids[j]])
            predicted += 1
    return {
        "accuracy": correct / len(rows),
        "loss": nll / count,
        "perplexity": math.exp(ppl_nll / predicted),
    }


def scores(model_dir: Path, task: Path, general: Path, batch_size: int) -> dict[str, float]:
    loaded = load_causal_lm(model_dir, CPU, str(model_dir))
    evaluator = Evaluator(
        encode_task(loaded.tokenizer, load_task(str(task)), loaded.context, str(task)),
        encode_general(loaded.tokenizer, load_general(str(general)), loaded.context, str(general)),
        batch_size,
        pad_id=0,
        device=CPU,
    )
    skill, general_score = evaluator.skill(loaded.model), evaluator.general(loaded.model)
    return {"accuracy": skill.accuracy, "loss": skill.loss, "perplexity": general_score.perplexity}


@pytest.fixture(scope="module")
def mixed_sets(eval_case, tmp_path_factory) -> tuple[Path, Path]:
    """24 held-out task examples, some with longer prompts (so batches pad) and some with a
    completion the model gets wrong (so the accuracy is strictly between 0 and 1), and 24
    general texts of two lengths."""
    rows = [json.loads(line) for line in eval_case.task.read_text().splitlines()][:24]
    rows[::5] = [{**r, "prompt": "w3 " + r["prompt"]} for r in rows[::5]]
    rows[1::7] = [{**r, "completion": r["completion"] + " w7"} for r in rows[1::7]]
    texts = [json.loads(line) for line in eval_case.general.read_text().splitlines()][:24]
    texts[::3] = [{"text": t["text"] + " w1 w2 w3"} for t in texts[::3]]
    directory = tmp_path_factory.mktemp("mixed")
    return write_jsonl(directory / "task.jsonl", rows), write_jsonl(directory / "g.jsonl", texts)


_references: dict[Path, dict[str, float]] = {}


@pytest.mark.parametrize("which", ["base", "finetuned"])
@pytest.mark.parametrize("batch_size", [1, 7])
def test_numbers_equal_the_reference_loop(eval_case, mixed_sets, which, batch_size):
    model_dir = getattr(eval_case, which)
    ours = scores(model_dir, *mixed_sets, batch_size)
    if model_dir not in _references:  # the slow float64 loop once per model
        _references[model_dir] = reference_scores(model_dir, *mixed_sets)
    ref = _references[model_dir]
    assert ours["accuracy"] == ref["accuracy"]
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert ours["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    if which == "finetuned":  # the trained pair: the skill is learned, not trivially 0 or 1
        assert 0.5 < ours["accuracy"] < 1.0


def test_the_finetune_learned_the_skill_and_forgot(eval_case):
    base = scores(eval_case.base, eval_case.task, eval_case.general, 16)
    ft = scores(eval_case.finetuned, eval_case.task, eval_case.general, 16)
    assert base["accuracy"] == 0.0 and ft["accuracy"] == 1.0
    assert ft["perplexity"] > 1.5 * base["perplexity"]


def test_the_general_set_is_cut_into_context_windows(eval_case, tmp_path):
    loaded = load_causal_lm(eval_case.base, CPU, "base")
    long_text = " ".join(f"w{i % 60}" for i in range(70))  # 70 tokens, context 32
    texts = load_general(str(write_jsonl(tmp_path / "g.jsonl", [{"text": long_text}])))
    windows = encode_general(loaded.tokenizer, texts, loaded.context, "g")
    assert [len(w) for w in windows] == [32, 32, 6]
    with pytest.raises(Exception, match="no examples"):
        Evaluator([], windows, 4, 0, CPU)


def test_a_completion_longer_than_the_context_names_its_line(eval_case, tmp_path):
    loaded = load_causal_lm(eval_case.base, CPU, "base")
    rows = [{"prompt": "w100 w61 w101", "completion": " w1"}] * 2
    rows.append({"prompt": "w100", "completion": " " + " ".join(["w5"] * 40)})
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(EvalDataError, match=r"t.jsonl line 3: .*41 tokens.*context \(32\)"):
        encode_task(loaded.tokenizer, load_task(str(path)), loaded.context, str(path))


def test_measures_and_the_undefined_forgetting():
    ref = Reference(skill_base=0.0, skill_ft=0.8, ppl_base=2.0, ppl_ft=4.0)
    assert skill_kept(0.6, ref) == pytest.approx(0.75)
    assert forgetting_left(3.0, ref) == pytest.approx(0.5)
    assert forgetting_left(2.0, ref) == 0.0 and ref.forgetting_note is None
    flat = Reference(skill_base=0.0, skill_ft=0.8, ppl_base=4.0, ppl_ft=3.9)
    assert forgetting_left(3.95, flat) is None
    assert "did not raise perplexity" in (flat.forgetting_note or "")
    assert skill_kept(0.5, Reference(0.0, 0.0, 2.0, 3.0)) is None
