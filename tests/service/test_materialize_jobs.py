"""Sparse deltas through the REST API, a real redis-server and a Celery worker: a prune job with
output_format "sparse-delta", then a materialize job that publishes the dense output of the same
job byte for byte, with progress through its stages; a materialize job on another base fails
with base_mismatch and publishes nothing; a delta outside the tenant's roots is never read."""

from __future__ import annotations

import json

import torch

from tests.models import make_llama_pair
from tests.service.conftest import client
from tests.service.test_worker_jobs import Jobs, reference_output, staging_dirs


def test_sparse_delta_and_materialize_jobs(service, service_pair, local_root, tmp_path):
    jobs = Jobs(service)
    spec = {
        "base": str(service_pair.base),
        "finetuned": str(service_pair.finetuned),
        "method": "magnitude",
        "sparsity": 0.9,
        "kernel": "torch",
    }
    delta = local_root / "api-delta"
    record = jobs.wait(jobs.submit({**spec, "output": str(delta), "output_format": "sparse-delta"}))
    assert record.status == "succeeded", record.error
    assert jobs.report(record.id)["sparse_delta"]["bytes"] > 0
    assert (delta / "fapm-delta.json").exists()

    out = local_root / "api-materialized"
    seen: list = []
    job = jobs.submit(
        {"base": str(service_pair.base), "output": str(out), "materialize": {"delta": str(delta)}}
    )
    record = jobs.wait(job, seen=seen)
    assert record.status == "succeeded", record.error
    dense = reference_output(spec, tmp_path)
    for path in dense.iterdir():
        if path.name not in ("README.md", "pruning_report.json"):
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["kind"] == "materialize" and report["job_id"] == job
    # A tiny job may pass its "materialize" stage between two polls; the progress only grows
    # and ends done.
    assert seen[-1].progress.stage == "done"
    fractions = [r.progress.fraction for r in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    other = make_llama_pair(local_root / "other-pair", dtype=torch.bfloat16, seed=12)
    wrong = local_root / "api-wrong-base"
    record = jobs.wait(
        jobs.submit(
            {"base": str(other.base), "output": str(wrong), "materialize": {"delta": str(delta)}}
        )
    )
    assert record.status == "failed" and record.error.code == "base_mismatch", record.error
    assert not wrong.exists() and not staging_dirs(wrong)


def test_materialize_bodies_the_api_refuses(service, service_pair, local_root, tmp_path):
    with client(service) as api:
        both = {
            "base": str(service_pair.base),
            "finetuned": str(service_pair.finetuned),
            "output": str(local_root / "m1"),
            "materialize": {"delta": str(local_root / "api-delta")},
        }
        response = api.post("/v1/jobs", json=both)
        assert response.status_code == 422 and "finetuned" in response.text
        no_base = {"output": str(local_root / "m2"), "materialize": {"delta": "/x"}}
        assert api.post("/v1/jobs", json=no_base).status_code == 422
    # A delta outside the tenant's roots: refused at submission, like any input.
    outside = {
        "base": str(service_pair.base),
        "output": str(local_root / "m3"),
        "materialize": {"delta": str(tmp_path)},
    }
    with client(service) as api:
        response = api.post("/v1/jobs", json=outside)
    assert response.status_code == 422, response.text
    assert "materialize.delta" in response.text
    assert not (local_root / "m3").exists()
