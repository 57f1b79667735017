"""A fine-tune with added vocabulary (more embedding and lm_head rows than the base, a task set
that uses an added token): evaluated prune jobs, sparsity "auto" and standalone evaluations work,
every candidate is the engine's output bit for bit, and the base is measured with the
fine-tune's added rows (checked against a model built by hand and a plain reference loop)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.eval_models import VOCAB
from tests.evaluation.added_vocab import EXTRA, NEW_MARK, token_id
from tests.evaluation.test_metrics import reference_scores
from tests.models import load_state_dict
from worker.engine.pipeline import run_prune
from worker.errors import ArchitectureMismatch
from worker.evaluation.candidates import CandidateBuilder
from worker.evaluation.job import run_job_spec
from worker.evaluation.model import load_causal_lm
from worker.evaluation.standalone import evaluate_model
from worker.spec import EvaluationSpec, JobSpec

CPU = torch.device("cpu")
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def spec_for(case, output: Path, **extra) -> JobSpec:
    return JobSpec.model_validate(
        {
            "base": str(case.base),
            "finetuned": str(case.finetuned),
            "output": str(output),
            "evaluate": {"task": str(case.task), "general": str(case.general), "max_examples": 24},
            **extra,
        }
    )


def test_the_case_adds_vocabulary_the_task_set_uses(vocab_case):
    base, finetuned = load_state_dict(vocab_case.base), load_state_dict(vocab_case.finetuned)
    for name in VOCAB_TENSORS:
        assert base[name].shape[0] == VOCAB and finetuned[name].shape[0] == VOCAB + EXTRA
    tokenizer = load_causal_lm(vocab_case.finetuned, CPU, "ft").tokenizer
    prompt = json.loads(vocab_case.task.read_text().splitlines()[0])["prompt"]
    assert token_id(NEW_MARK) == VOCAB
    assert tokenizer(prompt)["input_ids"][-1] == VOCAB  # an id only the fine-tune has a row for


@pytest.mark.parametrize(
    ("method", "scope"), [("fapm", "tensor"), ("magnitude", "row"), ("dare", "tensor")]
)
@pytest.mark.parametrize("budget", [None, 0], ids=["ranks", "per-tensor"])
def test_a_candidate_with_added_rows_is_the_engines_output_bit_for_bit(
    vocab_case, tmp_path, method, scope, budget
):
    spec = spec_for(vocab_case, tmp_path / "unused", sparsity="auto", scope=scope)
    work = load_causal_lm(vocab_case.finetuned, CPU, "ft", with_tokenizer=False)
    builder = CandidateBuilder(spec, work.model, CPU, rank_budget_bytes=budget)
    assert builder.mode == ("per-tensor" if budget == 0 else "ranks-host")
    params = dict(work.model.named_parameters())
    for sparsity in (0.6, 1.0):
        builder.write(method, sparsity)
        out = tmp_path / f"{method}-{sparsity}"
        concrete = {**spec.model_dump(), "sparsity": sparsity, "method": method, "output": str(out)}
        run_prune(JobSpec.model_validate({**concrete, "evaluate": None, "methods": None}))
        published = load_state_dict(out)
        assert published.keys() == params.keys()
        for name, tensor in published.items():
            assert torch.equal(params[name].detach(), tensor), (method, sparsity, name)
    # At sparsity 1 the shared rows are the base's and the added rows the fine-tune's.
    base, finetuned = load_state_dict(vocab_case.base), load_state_dict(vocab_case.finetuned)
    for name in VOCAB_TENSORS:
        assert torch.equal(params[name][:VOCAB].detach(), base[name])
        assert torch.equal(params[name][VOCAB:].detach(), finetuned[name][VOCAB:])
    builder.write_finetuned()
    assert all(torch.equal(p.detach(), finetuned[n]) for n, p in params.items())


def base_with_added_rows(vocab_case, directory: Path) -> Path:
    """By hand: the base's tensors, its embeddings and lm_head grown by the fine-tune's added
    rows, saved with the fine-tune's config and tokenizer."""
    directory.mkdir()
    for item in vocab_case.finetuned.iterdir():
        if not item.name.endswith(".safetensors"):
            shutil.copy(item, directory / item.name)
    tensors = load_state_dict(vocab_case.base)
    finetuned = load_state_dict(vocab_case.finetuned)
    for name in VOCAB_TENSORS:
        tensors[name] = torch.cat([tensors[name], finetuned[name][VOCAB:]]).contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_the_base_is_measured_with_the_finetunes_added_rows(vocab_case, tmp_path):
    settings = EvaluationSpec(task=str(vocab_case.task), general=str(vocab_case.general))
    section = evaluate_model(
        str(vocab_case.base), str(vocab_case.finetuned), settings, "cpu", str(vocab_case.finetuned)
    )
    expected = reference_scores(
        base_with_added_rows(vocab_case, tmp_path / "grown"), vocab_case.task, vocab_case.general
    )
    base = section["references"]["base"]
    assert base["skill"] == expected["accuracy"]
    assert base["completion_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert base["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert f"the {EXTRA} vocabulary rows it lacks" in section["note"]
    # The added marker carries the skill: the fine-tune has it all, the base none.
    assert section["references"]["finetuned"]["skill"] == 1.0 and base["skill"] == 0.0
    assert base["forgetting_left"] == 0.0 and section["points"][0]["skill_kept"] == 1.0


def test_a_reference_without_the_added_rows_fails_clearly(vocab_case, eval_case):
    """The model's tokenizer uses id 128; a fine-tuned reference without that row cannot be
    measured on it: architecture_mismatch naming it, not an index error."""
    settings = EvaluationSpec(task=str(vocab_case.task), general=str(vocab_case.general))
    with pytest.raises(
        ArchitectureMismatch, match=r"vocabulary has 128 tokens.*token id 1\d\d"
    ) as e:
        evaluate_model(
            str(vocab_case.base),
            str(vocab_case.finetuned),
            settings,
            "cpu",
            str(eval_case.finetuned),
        )
    assert str(eval_case.finetuned) in e.value.message


def test_auto_with_added_vocabulary_publishes_the_engines_model(vocab_case, tmp_path):
    out = tmp_path / "auto"
    spec = spec_for(vocab_case, out, sparsity="auto", methods=["magnitude"],
                    target={"min_skill_kept": 0.9})  # fmt: skip
    evaluation = run_job_spec(spec).report["evaluation"]
    chosen, references = evaluation["chosen"], evaluation["references"]
    assert chosen["meets_floor"] and chosen["skill_kept"] >= 0.9 and chosen["sparsity"] > 0
    assert references["finetuned"]["skill"] == 1.0 and references["base"]["skill"] == 0.0
    assert chosen["forgetting_left"] < 0.6  # pruning still trades, added vocabulary or not
    assert f"the {EXTRA} vocabulary rows it lacks" in evaluation["note"]
    # The references are the standalone evaluation's numbers.
    standalone = evaluate_model(
        str(vocab_case.base),
        str(vocab_case.finetuned),
        EvaluationSpec(task=str(vocab_case.task), general=str(vocab_case.general), max_examples=24),
        "cpu",
        str(vocab_case.finetuned),
    )["references"]
    for name in ("base", "finetuned"):
        for key in ("skill", "completion_loss", "perplexity"):
            assert references[name][key] == standalone[name][key], (name, key)
    # What is published is run_prune's at the choice, byte for byte, added rows included.
    plain = tmp_path / "plain"
    run_prune(
        JobSpec(
            base=str(vocab_case.base),
            finetuned=str(vocab_case.finetuned),
            output=str(plain),
            method=chosen["method"],
            sparsity=chosen["sparsity"],
        )
    )
    assert (out / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    assert load_state_dict(out)["lm_head.weight"].shape[0] == VOCAB + EXTRA
