"""Evaluated merges on two trained tiny fine-tunes of one base (tests/evaluation/merge_case.py):
each reference's and candidate's per-task skill and perplexity equal a plain float64 loop over the
published model (greedy generation token by token), the published bytes are the plain merge's,
sparsity "auto" publishes a model that measures what the report says, and the misuse is a 422."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tests.evaluation.merge_case import MergeCase, build_merge_case
from worker.engine.pipeline import run_prune
from worker.evaluation.job import run_job_spec
from worker.evaluation.search import evaluations_per_method
from worker.spec import JobSpec

EXAMPLES = 24


@pytest.fixture(scope="module")
def merge_case(eval_case, tmp_path_factory) -> MergeCase:
    return build_merge_case(eval_case, tmp_path_factory.mktemp("merge_case"))


def merge_body(case: MergeCase, output: Path, **extra) -> dict:
    return {
        "base": str(case.base),
        "output": str(output),
        "finetuned": [
            {"model": str(model), "task": str(task)}
            for model, task in zip(case.finetuned, case.tasks, strict=True)
        ],
        "merge": {"rule": "task_arithmetic", "normalize": True},
        "method": "magnitude",
        "evaluate": {"general": str(case.general), "max_examples": EXAMPLES},
        **extra,
    }


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()][:EXAMPLES]


def plain_measures(model_dir: Path, tokenizer_dir: Path, tasks: list[Path], general: Path):
    """(exact-match skill per task set, perplexity): float64, one example at a time, greedy
    generation token by token; no code of worker/evaluation."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    skills = []
    with torch.no_grad():
        for task in tasks:
            correct = 0
            rows = _lines(task)
            for row in rows:
                prompt = tokenizer(row["prompt"])["input_ids"]
                joint = tokenizer(row["prompt"] + row["completion"])["input_ids"]
                expected = joint[len(prompt) :]
                ids = list(prompt)
                for _ in expected:
                    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                    ids.append(int(torch.argmax(logits)))
                correct += ids[len(prompt) :] == expected
            skills.append(correct / len(rows))
        nll, count = 0.0, 0
        for row in _lines(general):
            ids = tokenizer(row["text"])["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            logp = torch.log_softmax(logits, dim=-1)
            for position, target in enumerate(ids[1:]):
                nll -= float(logp[position, target])
                count += 1
    return skills, math.exp(nll / count)


def test_references_and_a_merge_measure_what_a_plain_loop_measures(merge_case, tmp_path):
    out = tmp_path / "merged"
    spec = JobSpec.model_validate(merge_body(merge_case, out, sparsity=0.5))
    result = run_job_spec(spec)
    evaluation = result.report["evaluation"]
    refs, [point] = evaluation["references"], evaluation["points"]
    tasks, general = list(merge_case.tasks), merge_case.general
    tokenizer = merge_case.finetuned[0]  # the first input's: the merge's tokenizer

    base_skills, base_ppl = plain_measures(merge_case.base, tokenizer, tasks, general)
    assert [t["skill"] for t in refs["base"]["tasks"]] == base_skills
    assert refs["base"]["perplexity"] == pytest.approx(base_ppl, rel=1e-5)
    own = []
    for i, model in enumerate(merge_case.finetuned):
        [skill], ppl = plain_measures(model, tokenizer, [tasks[i]], general)
        ref = refs[f"finetuned[{i}]"]
        assert [t["skill"] for t in ref["tasks"]] == [skill] and skill >= 0.9  # it learned it
        assert ref["perplexity"] == pytest.approx(ppl, rel=1e-5)
        own.append((skill, ppl))
    mean_ft_ppl = (own[0][1] + own[1][1]) / 2
    assert refs["finetuned"]["perplexity"] == pytest.approx(mean_ft_ppl, rel=1e-5)

    # The candidate is the published model: measured again from its files by the plain loop.
    skills, ppl = plain_measures(out, out, tasks, general)
    assert [t["skill"] for t in point["tasks"]] == skills
    kept = [skills[i] / own[i][0] for i in range(2)]
    assert [t["skill_kept"] for t in point["tasks"]] == pytest.approx(kept)
    assert point["skill_kept"] == pytest.approx(sum(kept) / 2)
    assert point["perplexity"] == pytest.approx(ppl, rel=1e-5)
    left = (ppl - base_ppl) / (mean_ft_ppl - base_ppl)
    assert point["forgetting_left"] == pytest.approx(left, rel=1e-4)
    # The merge kept something of task A and forgot part of what the fine-tunes forgot.
    assert 0 < point["skill_kept"] < 1 and 0 < point["forgetting_left"] < 1

    # The published bytes are the plain merge's (no evaluate): what was measured is what ships.
    plain = tmp_path / "plain"
    run_prune(JobSpec.model_validate({**merge_body(merge_case, plain, sparsity=0.5),
                                      "evaluate": None, "finetuned": [
                                          {"model": str(m)} for m in merge_case.finetuned]}))  # fmt: skip
    assert (out / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "each input's task set" in card
    assert f"`{tasks[1]}`" in card and "| finetuned[1] |" in card


def test_auto_on_a_merge_publishes_a_sparsity_that_measures_what_the_report_says(
    merge_case, tmp_path
):
    out = tmp_path / "auto"
    body = merge_body(merge_case, out, sparsity="auto", target={"min_skill_kept": 0.45})
    body["finetuned"][1]["sparsity"] = 0.3  # its own: the search applies to input 0 only
    result = run_job_spec(JobSpec.model_validate(body))
    report = result.report
    evaluation, chosen = report["evaluation"], report["evaluation"]["chosen"]
    assert len(evaluation["points"]) == evaluations_per_method()
    assert evaluation["evaluations"] == 1 + 2 + evaluations_per_method()  # base, 2 fine-tunes
    assert chosen["meets_floor"] and chosen["skill_kept"] >= 0.45 and chosen["sparsity"] > 0
    keeping = [p for p in evaluation["points"] if p["meets_floor"]]
    assert chosen["perplexity"] == min(p["perplexity"] for p in keeping)
    # The published job is the concrete one: the chosen sparsity on input 0, input 1's own.
    assert report["spec"]["sparsity"] == chosen["sparsity"]
    assert [one["sparsity"] for one in report["merge"]["inputs"]] == [chosen["sparsity"], 0.3]
    skills, ppl = plain_measures(out, out, list(merge_case.tasks), merge_case.general)
    assert [t["skill"] for t in chosen["tasks"]] == skills
    assert chosen["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert evaluation["plots"] == ["evaluation.png", "evaluation.svg"]
    assert (out / "evaluation.png").read_bytes()[:4] == b"\x89PNG"
    assert "the mean over their tasks" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"evaluate": {"general": "/g", "task": "/t"}}, "evaluate.task", "put the task sets"),
        ({"finetuned": [{"model": "/a", "task": "/t"}, {"model": "/b"}]}, "finetuned", "[1] task"),
        ({"evaluate": None, "sparsity": 0.5}, "finetuned", "with evaluate only"),
        ({"finetuned": [{"model": "/a", "task": "/t", "sparsity": 0.5}]}, "sparsity",
         "nothing to search"),
        ({"methods": ["magnitude", "fapm"],
          "finetuned": [{"model": "/a", "task": "/t", "method": "dare"}]}, "methods",
         "nothing to search"),
        ({"methods": ["magnitude", "nps"]}, "finetuned", "not yet for merges"),
        ({"evaluate": None}, "evaluate", "a task on each input"),
        ({"evaluate": {"task": "/t"}}, "evaluate", "general: required"),
        ({"method": "nps"}, "finetuned", "[0] method nps: not yet"),  # nps with "auto"
        ({"sparsity": 0.5, "nps": {"weights": [1.0, 1.0]}, "method": "nps"}, "nps",
         "finetuned[i].nps_weights"),
        ({"sparsity": 0.5, "method": "nps",
          "finetuned": [{"model": "/a", "task": "/t", "nps_weights": [1.0] * 8},
                        {"model": "/c", "task": "/u"}]}, "finetuned", "[1] nps_weights: give"),
        ({"sparsity": 0.5, "method": "nps", "evaluate": None,
          "finetuned": [{"model": "/a", "nps_weights": [1.0] * 3}]}, "finetuned",
         "3 given, the bands at sparsity 0.5 are"),
        ({"sparsity": 0.5, "evaluate": None,
          "finetuned": [{"model": "/a", "nps_weights": [1.0]}]}, "finetuned",
         'apply to method "nps" only'),
        ({"sparsity": 0.5, "method": "nps", "evaluate": None, "finetuned": [{"model": "/a"}]},
         "evaluate", "searches band weights"),
    ],
)  # fmt: skip
def test_misuse_is_refused_at_submission(change, field, words):
    body = {
        "base": "/b",
        "output": "/o",
        "sparsity": "auto",
        "finetuned": [{"model": "/a", "task": "/t"}, {"model": "/c", "task": "/u"}],
        "evaluate": {"general": "/g"},
        **change,
    }
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(body)
    message = caught.value.errors()[0]["msg"].removeprefix("Value error, ")
    assert message.startswith(f"{field}: ") and words in message, message


def test_single_pair_evaluation_still_needs_its_task_set():
    with pytest.raises(ValidationError, match=r"evaluate\.task: required"):
        JobSpec(base="/b", finetuned="/f", output="/o", evaluate={"general": "/g"})
    spec = JobSpec(base="/b", finetuned="/f", output="/o", evaluate={"task": "/t", "general": "/g"})
    assert spec.evaluate is not None and spec.evaluate.task == "/t"
