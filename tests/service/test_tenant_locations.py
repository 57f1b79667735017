"""Tenant locations over the real stack (redis-server, uvicorn, a Celery worker): each tenant
reads and writes only its own locations (FAPM_TENANT_LOCATIONS_FILE), an output is never a root,
`overwrite` replaces only a model fapm published, and a symlink that leads out of the tenant's
roots fails the job with nothing of its target read or published."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from app.jobs.records import JobRecord
from app.jobs.store import JobStore, new_job_id
from tests.models import ModelPair, make_llama_pair
from tests.service.conftest import HF_WEBHOOK_SECRET, _stack, client
from tests.service.test_api_hooks import deliver, push
from worker.celery_app import RUN_JOB_TASK, celery_app
from worker.localstack import LocalStack
from worker.spec import JobSpec

SECRET = b"SECRET-OUTSIDE-EVERY-ROOT"


@dataclass
class Places:
    top: Path  # holds every root below (and nothing else a tenant may use)
    bases: Path  # both tenants read
    alice: Path  # alice writes
    bob: Path  # bob writes
    outside: Path  # in no root
    pair: ModelPair
    file: Path  # the tenant locations file


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> Places:
    top = tmp_path_factory.mktemp("tenants").resolve()
    bases, alice, bob, outside = (top / n for n in ("bases", "alice", "bob", "outside"))
    for path in (bases, alice, bob, outside):
        path.mkdir()
    pair = make_llama_pair(bases / "pair", dtype=torch.bfloat16, seed=5)
    table = {
        "tenants": {
            "alice": {"read": [str(bases), "hf://acme"], "write": [str(alice)]},
            "bob": {"read": [str(bases), "hf://acme"], "write": [str(bob)]},
        }
    }
    file = top / "outside" / "tenants.yaml"
    file.write_text(yaml.safe_dump(table))
    return Places(top, bases, alice, bob, outside, pair, file)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, local_root, places) -> Iterator[LocalStack]:
    env = {"FAPM_TENANT_LOCATIONS_FILE": str(places.file)}
    stack = _stack(tmp_path_factory.mktemp("tenant_stack"), local_root, env)
    try:
        stack.start(workers=1)
        yield stack
    finally:
        stack.stop()


def submit(stack: LocalStack, tenant: str, body: dict):
    with client(stack, tenant) as http:
        return http.post("/v1/jobs", json=body)


def wait(stack: LocalStack, tenant: str, job_id: str, timeout: float = 120) -> JobRecord:
    import time

    deadline = time.monotonic() + timeout
    with client(stack, tenant) as http:
        while True:
            record = JobRecord.model_validate(http.get(f"/v1/jobs/{job_id}").json())
            if record.status in ("succeeded", "failed", "cancelled"):
                return record
            assert time.monotonic() < deadline, record
            time.sleep(0.1)


def run(stack: LocalStack, tenant: str, body: dict) -> JobRecord:
    response = submit(stack, tenant, body)
    assert response.status_code == 202, response.text
    return wait(stack, tenant, response.json()["id"])


def refused(response, field: str) -> str:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["code"] == "invalid_location", problem
    assert field in [e["field"] for e in problem["errors"]], problem
    return problem["detail"]


def spec(places: Places, output: Path | str, **extra) -> dict:
    pair = places.pair
    return {"base": str(pair.base), "finetuned": str(pair.finetuned), "output": str(output)} | {
        "sparsity": 0.5,
        **extra,
    }


def tree(path: Path) -> dict[str, bytes]:
    """Every regular file under `path` (not symlinks) and its bytes."""
    files = (p for p in sorted(path.rglob("*")) if p.is_file() and not p.is_symlink())
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def no_staging_left(*directories: Path) -> bool:
    return not [p for d in directories for p in d.rglob("*") if ".fapm-staging-" in p.name]


def test_each_tenant_reads_and_writes_only_its_own_locations(stack, places):
    out = places.alice / "model-a"
    record = run(stack, "alice", spec(places, out))
    assert record.status == "succeeded", record.error
    published = tree(out)
    # Bob can neither read alice's output, write into her root, nor replace her model.
    bob_reads = spec(places, places.bob / "b1") | {"finetuned": str(out)}
    assert "tenant bob" in refused(submit(stack, "bob", bob_reads), "finetuned")
    refused(submit(stack, "bob", spec(places, places.alice / "b2")), "output")
    refused(submit(stack, "bob", spec(places, out, overwrite=True)), "output")
    # Read-only locations are not writable, even by a tenant that may read them.
    refused(submit(stack, "alice", spec(places, places.bases / "a2")), "output")
    # Hub: alice may read hf://acme but publish nothing there.
    hub = spec(places, "hf://acme/pruned") | {"finetuned": "hf://acme/llama-sft@main"}
    assert "may write" in refused(submit(stack, "alice", hub), "output")
    assert tree(out) == published and not (places.alice / "b2").exists()


def test_a_root_or_its_parent_as_output_is_refused_and_the_root_is_intact(stack, places):
    (places.alice / "keep.txt").write_text("alice's data")
    before = tree(places.alice)
    for output in (places.alice, places.top, places.pair.base.parent):
        response = submit(stack, "alice", spec(places, output, overwrite=True))
        refused(response, "output")
    # An output that is an input, or lies inside one, is refused too.
    refused(submit(stack, "alice", spec(places, places.pair.finetuned, overwrite=True)), "output")
    assert tree(places.alice) == before
    assert no_staging_left(places.top)


def test_a_root_as_output_is_refused_without_a_tenant_file(api_stack, local_root):
    """FAPM_LOCAL_ROOTS alone (every tenant shares it): the root itself is no output either."""
    (local_root / "keep-me.txt").write_text("x")
    body = {"base": str(local_root), "finetuned": str(local_root), "output": str(local_root)}
    detail = refused(submit(api_stack, "alice", body | {"overwrite": True}), "output")
    assert "local root itself" in detail
    assert (local_root / "keep-me.txt").read_text() == "x"


def test_overwrite_replaces_a_published_model_never_other_data(stack, places):
    data = places.alice / "data"
    data.mkdir()
    (data / "precious.txt").write_text("not a model")
    record = run(stack, "alice", spec(places, data, overwrite=True))
    assert record.status == "failed" and record.error.code == "output_not_replaceable"
    assert "fapm published" in record.error.message
    assert tree(data) == {"precious.txt": b"not a model"}
    # A model fapm published is replaced.
    out = places.alice / "model-o"
    assert run(stack, "alice", spec(places, out)).status == "succeeded"
    (out / "stale.txt").write_text("from before")
    record = run(stack, "alice", spec(places, out, overwrite=True, method="magnitude"))
    assert record.status == "succeeded", record.error
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "pruning_report.json").read_text())["spec"]["method"] == "magnitude"
    assert no_staging_left(places.alice)


def _model_with_link(places: Places, tenant_root: Path, name: str, file: str, target: Path) -> Path:
    """A copy of the fine-tune in the tenant's root whose `file` is a symlink to `target`."""
    model = tenant_root / name
    shutil.copytree(places.pair.finetuned, model)
    (model / file).unlink()
    (model / file).symlink_to(target)
    return model


@pytest.mark.parametrize("file", ["model.safetensors", "tokenizer_config.json"])
def test_a_symlink_out_of_the_roots_fails_the_job_and_nothing_of_it_is_published(
    stack, places, file
):
    target = places.outside / file
    if file == "model.safetensors":  # a valid checkpoint: only the location is wrong
        shutil.copy(places.pair.finetuned / file, target)
    else:
        target.write_bytes(b'{"secret": "' + SECRET + b'"}')
    model = _model_with_link(places, places.alice, f"linked-{file}", file, target)
    out = places.alice / f"out-linked-{file}"
    record = run(stack, "alice", spec(places, out) | {"finetuned": str(model)})
    assert record.status == "failed", record
    assert record.error.code == "invalid_location", record.error
    assert file in record.error.message
    assert not out.exists() and no_staging_left(places.alice)
    assert all(SECRET not in data for data in tree(places.alice).values())


def test_a_symlink_into_another_tenants_root_fails_the_job(stack, places):
    """Bob's model links its weights to a file in alice's root: inside a root, but not one of
    bob's, so the worker refuses it."""
    alices = places.alice / "alices-weights.safetensors"
    shutil.copy(places.pair.finetuned / "model.safetensors", alices)
    model = _model_with_link(places, places.bob, "borrowed", "model.safetensors", alices)
    out = places.bob / "out-borrowed"
    record = run(stack, "bob", spec(places, out) | {"finetuned": str(model)})
    assert record.status == "failed" and record.error.code == "invalid_location", record.error
    assert "model.safetensors" in record.error.message
    assert not out.exists()


def test_the_worker_checks_the_records_tenant(stack, places):
    """A job written past the API (as the Hub webhook or a sweeper would enqueue it) for bob,
    reading alice's files, fails in the worker with invalid_location and writes nothing."""
    store = JobStore.from_url(stack.redis_url)
    body = spec(places, places.bob / "past-the-api") | {"finetuned": str(places.alice)}
    job_id = new_job_id()
    outcome = store.create(
        job_id=job_id,
        tenant="bob",
        queue="cpu",
        spec_json=JobSpec.model_validate(body).model_dump(mode="json"),
        labels={},
        webhook_url=None,
        webhook_secret=None,
        max_active=1000,
    )
    assert outcome.kind == "created"
    with celery_app.connection_for_write(stack.redis_url) as connection:
        celery_app.send_task(RUN_JOB_TASK, args=[job_id], queue="cpu", connection=connection)
    store.mark_enqueued(job_id)
    record = wait(stack, "bob", job_id)
    assert record.status == "failed" and record.error.code == "invalid_location", record.error
    assert "finetuned" in record.error.message and "tenant bob" in record.error.message
    assert not (places.bob / "past-the-api").exists()


def test_an_output_name_longer_than_the_file_system_allows_is_a_422(stack, places):
    detail = refused(submit(stack, "alice", spec(places, places.alice / ("n" * 300))), "output")
    assert "at most 255" in detail


def test_hub_webhook_jobs_are_checked_for_the_rules_tenant(make_stack, places, tmp_path):
    rules = [
        {"repo": "acme/a-*", "tenant": "alice", "base": str(places.pair.base),
         "output": f"{places.alice}/hub/{{name}}"},
        {"repo": "acme/b-*", "tenant": "bob", "base": str(places.pair.base),
         "output": f"{places.alice}/hub/{{name}}"},
    ]  # fmt: skip
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules))
    stack = make_stack(
        FAPM_TENANT_LOCATIONS_FILE=str(places.file), FAPM_HF_WEBHOOK_RULES_FILE=str(rules_file)
    )
    stack.start_redis()
    stack.start_api()  # no worker: the accepted job stays queued
    accepted = deliver(stack, push("acme/a-model"), secret=HF_WEBHOOK_SECRET)
    assert accepted.status_code == 202 and accepted.json()["status"] == "queued", accepted.text
    detail = refused(deliver(stack, push("acme/b-model"), secret=HF_WEBHOOK_SECRET), "output")
    assert "tenant bob" in detail
