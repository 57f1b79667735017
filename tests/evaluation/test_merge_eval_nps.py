"""method "nps" on a merge: CMA-ES over every nps input's band weights and the merge's lam, the
fitness the mean skill kept over the inputs' tasks; the published merge carries the chosen
weights (finetuned[i].nps_weights, merge.lam) and measures what the report says; an input's
nps_weights prune it as a single pair's nps.weights do."""

from __future__ import annotations

import pytest
import torch

from tests.evaluation.merge_case import MergeCase, build_merge_case
from tests.evaluation.test_merge_eval import merge_body, plain_measures
from tests.models import load_state_dict
from worker.engine.pipeline import run_prune
from worker.evaluation.job import run_job_spec
from worker.spec import JobSpec


@pytest.fixture(scope="module")
def merge_case(eval_case, tmp_path_factory) -> MergeCase:
    return build_merge_case(eval_case, tmp_path_factory.mktemp("merge_case"))


def test_an_nps_merge_search_publishes_the_weights_it_reports(merge_case, tmp_path):
    out = tmp_path / "nps"
    body = merge_body(
        merge_case,
        out,
        sparsity=0.7,
        nps={"generations": 1, "population": 3, "bands": 4, "objective": "skill"},
    )
    body["finetuned"][1]["method"] = "nps"  # input 0 stays magnitude (the job's method)
    report = run_job_spec(JobSpec.model_validate(body)).report
    search = report["evaluation"]["nps"]
    assert search["evaluations"] == 1 + 3 == report["evaluation"]["evaluations"] - 3
    [part] = search["merge"]["inputs"]
    assert part["input"] == 1 and len(part["weights"]) == len(part["band_edges"]) - 1
    # The searched vector is input 1's weights, then lam: the report splits the best one so.
    assert search["weights"] == [*part["weights"], search["merge"]["lam"]]
    assert search["fitness"] >= search["magnitude_fitness"]
    published = report["spec"]
    assert published["method"] == "magnitude" and published["finetuned"][0]["nps_weights"] is None
    assert published["finetuned"][1]["nps_weights"] == part["weights"]
    assert published["merge"]["lam"] == search["merge"]["lam"]
    # The chosen point is the published model, measured again by the plain loop; its fitness
    # is the mean skill kept (the loss term is below one example's worth).
    chosen = report["evaluation"]["chosen"]
    skills, ppl = plain_measures(out, out, list(merge_case.tasks), merge_case.general)
    assert [t["skill"] for t in chosen["tasks"]] == skills
    assert chosen["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert search["fitness"] == pytest.approx(chosen["skill_kept"], abs=1 / (2 * 24 + 1))
    assert search["fitness"] <= chosen["skill_kept"]
    # Publishing the reported spec again, without evaluate, gives the same bytes.
    again = tmp_path / "again"
    plain = {**published, "output": str(again), "evaluate": None}
    plain["finetuned"] = [{**one, "task": None} for one in published["finetuned"]]
    run_prune(JobSpec.model_validate(plain))
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert "merge lambda" in (out / "README.md").read_text()
    assert (out / "nps_search.png").exists()


def test_an_inputs_nps_weights_prune_it_as_a_single_pairs_do(merge_case, tmp_path):
    weights = [1.5, 0.25, 1.0]  # the three bands at sparsity 0.7 with bands 4
    single = tmp_path / "single"
    common = {"base": str(merge_case.base), "method": "nps", "sparsity": 0.7}
    run_prune(JobSpec.model_validate({**common, "finetuned": str(merge_case.finetuned[1]),
                                      "output": str(single),
                                      "nps": {"bands": 4, "weights": weights}}))  # fmt: skip
    merged = tmp_path / "merged"
    run_prune(JobSpec.model_validate({**common, "output": str(merged), "nps": {"bands": 4},
                                      "finetuned": [{"model": str(merge_case.finetuned[1]),
                                                     "nps_weights": weights}]}))  # fmt: skip
    ones = tmp_path / "ones"
    run_prune(JobSpec.model_validate({**common, "output": str(ones), "nps": {"bands": 4},
                                      "finetuned": [{"model": str(merge_case.finetuned[1]),
                                                     "nps_weights": [1.0] * 3}]}))  # fmt: skip
    a, b, c = load_state_dict(single), load_state_dict(merged), load_state_dict(ones)
    base = load_state_dict(merge_case.base)
    differs = False
    for name, tensor in a.items():
        # A merge of one input is W + (O - W) in float32: O up to that rounding.
        assert torch.allclose(b[name], tensor, rtol=0, atol=1e-6), name
        differs |= not torch.equal(c[name], b[name]) and name in base
    assert differs  # the weights were applied (all ones would be magnitude's order)
