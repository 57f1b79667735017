"""A prefix-mapped pair through the service: a real API, Celery worker and Redis (issue 13 item 2).

A BertForSequenceClassification fine-tune (`bert.*` + `classifier.*`) of a BertModel base that
holds an int64 position_ids buffer: the job succeeds, its report states the pairing and the
left-out buffer, and its weights are those of the same job run in process.
"""

from __future__ import annotations

import torch

from tests.models import load_state_dict
from tests.service.test_worker_jobs import Jobs
from tests.wild_models import make_bert_head_pair
from worker.engine.pipeline import run_prune
from worker.spec import JobSpec


def test_a_head_on_a_base_encoder_as_a_service_job(service, local_root):
    jobs = Jobs(service)
    base_dir, ft_dir = make_bert_head_pair(local_root / "wild_bert")
    out = local_root / "wild_bert" / "out"
    spec = {"base": str(base_dir), "finetuned": str(ft_dir), "output": str(out), "sparsity": 0.8}
    record = jobs.wait(jobs.submit(spec))
    assert record.status == "succeeded", record.error

    report = jobs.report(record.id)
    assert report is not None
    assert report["name_map"]["finetuned_prefix"] == "bert."
    assert [t["name"] for t in report["left_out"]] == ["embeddings.position_ids"]
    assert any("'bert.'" in note for note in report["notes"])

    in_process = local_root / "wild_bert" / "in_process"
    run_prune(JobSpec.model_validate({**spec, "output": str(in_process)}))
    got, expected = load_state_dict(out), load_state_dict(in_process)
    assert set(got) == set(load_state_dict(ft_dir))
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
