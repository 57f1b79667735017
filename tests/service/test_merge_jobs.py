"""A merge through the REST API and a real worker: two fine-tunes of one base merged by TIES
publish the same bytes as the engine run directly; each fine-tune is an input under the tenant's
read rules (a 422 naming it, not a 500)."""

from __future__ import annotations

import torch

from tests.integration.test_merge_rules import make_finetunes
from tests.models import make_llama_pair
from tests.service.conftest import client
from tests.service.test_worker_jobs import Jobs
from worker.engine.pipeline import run_prune
from worker.spec import JobSpec


def test_a_merge_through_the_api(service, local_root, tmp_path):
    pair = make_llama_pair(local_root / "merge-pair", dtype=torch.bfloat16, seed=7)
    finetunes = make_finetunes(pair.base, local_root / "merge-fts", 2)
    body = {
        "base": str(pair.base),
        "finetuned": [{"model": str(f), "sparsity": 0.8} for f in finetunes],
        "merge": {"rule": "ties"},
        "method": "magnitude",
        "output": str(local_root / "merged"),
    }
    jobs = Jobs(service)
    record = jobs.wait(jobs.submit(body), timeout=180)
    assert record.status == "succeeded", record.error
    direct = tmp_path / "direct"
    run_prune(JobSpec.model_validate({**body, "output": str(direct)}))
    assert (local_root / "merged" / "model.safetensors").read_bytes() == (
        direct / "model.safetensors"
    ).read_bytes()
    with client(service) as api:
        outside = {**body, "output": str(local_root / "m2")}
        outside["finetuned"] = [*body["finetuned"][:1], {"model": "/etc", "sparsity": 0.8}]
        response = api.post("/v1/jobs", json=outside)
        assert response.status_code == 422, response.text
        assert "finetuned[1].model" in response.text
