"""POST /v1/hooks/mlflow over real HTTP, with a real MLflow tracking server (SQLite) delivering
its own webhooks to the API on loopback; refusals checked with deliveries signed by MLflow's own
signer (mlflow.webhooks.delivery)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
from mlflow.webhooks.delivery import _generate_hmac_signature

from app.api.routes.mlflow_hooks import mlflow_signature
from app.core.config import Settings
from app.core.locations import check_job_locations
from app.jobs.store import JobStore
from tests.remote.test_mlflow_registry import start_mlflow_server
from tests.service.conftest import FAST_ENV, client
from worker.localstack import LocalStack
from worker.spec import JobSpec

SECRET = "mlflow-webhook-secret-for-tests"


def test_our_signature_is_mlflows():
    # MLflow signs json.dumps(payload) (ASCII escapes) and posts its UTF-8 bytes; any bytes work.
    for payload in ({"a": 1}, {"name": "modèle-été", "tags": {"k": "v ✓"}}, {}):
        text = json.dumps(payload)
        for delivery, stamp in (("d1", "1700000000"), (str(uuid.uuid4()), str(int(time.time())))):
            assert mlflow_signature(SECRET, delivery, stamp, text.encode()) == (
                _generate_hmac_signature(SECRET, delivery, stamp, text)
            )
    raw = json.dumps({"x": "é"}, ensure_ascii=False)
    assert mlflow_signature(SECRET, "d", "1", raw.encode()) == _generate_hmac_signature(
        SECRET, "d", "1", raw
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory, local_root) -> Iterator[str]:
    # Artifacts inside the tenants' local root: the workers may read the versions' files.
    work = tmp_path_factory.mktemp("mlflow_hooks")
    process, url = start_mlflow_server(work / "server", str(local_root / "mlflow-artifacts"), {})
    try:
        yield url
    finally:
        process.stop()


@pytest.fixture(scope="module")
def hook_stack(tmp_path_factory, local_root, registry) -> Iterator[LocalStack]:
    rules = [
        {
            "model": "support-*",
            "events": ["model_version.created", "model_version_tag.set"],
            "tags": {"fapm.prune": "true"},
            "tenant": "alice",
            "base": str(local_root / "bases" / "llama"),
            "method": "magnitude",
            "sparsity": 0.5,
            "output": "mlflow://{name}",
            "mlflow": {"alias": "pruned"},
            "labels": {"from": "mlflow-{version}"},
        }
    ]
    work = tmp_path_factory.mktemp("mlflow_stack")
    (work / "rules.yaml").write_text(yaml.safe_dump(rules))
    env = {
        **FAST_ENV,
        "FAPM_LOCAL_ROOTS": str(local_root),
        "FAPM_MLFLOW_WEBHOOK_SECRET": SECRET,
        "FAPM_MLFLOW_WEBHOOK_RULES_FILE": str(work / "rules.yaml"),
        "FAPM_MLFLOW_TRACKING_URI": registry,
    }
    stack = LocalStack(work / "stack", env=env)
    stack.workdir.mkdir(parents=True, exist_ok=True)
    try:
        stack.start_redis()
        stack.start_api()
        yield stack
    finally:
        stack.stop()


def deliver(
    stack: LocalStack,
    payload: dict,
    secret: str | None = SECRET,
    stamp: int | None = None,
    delivery: str | None = None,
    body: bytes | None = None,
) -> httpx.Response:
    """A delivery as MLflow sends it (headers, and the signature from MLflow's own signer)."""
    text = json.dumps(payload)
    delivery = delivery or str(uuid.uuid4())
    stamp_text = str(int(time.time()) if stamp is None else stamp)
    headers = {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": stamp_text,
    }
    if secret is not None:
        headers["X-MLflow-Signature"] = _generate_hmac_signature(secret, delivery, stamp_text, text)
    return httpx.post(
        f"{stack.api_url}/v1/hooks/mlflow",
        content=body if body is not None else text.encode(),
        headers=headers,
        timeout=30,
    )


def created(name: str, version: str, tags: dict | None = None) -> dict:
    return {
        "entity": "model_version",
        "action": "created",
        "timestamp": "2026-01-01T00:00:00+00:00",
        "data": {
            "name": name,
            "version": version,
            "source": "models:/m-0",
            "run_id": None,
            "tags": tags or {},
            "description": None,
        },
    }


def _jobs(stack: LocalStack, name: str) -> list:
    store = JobStore.from_url(stack.redis_url)
    return store.list("alice", label=("mlflow_model", name), limit=50)[0]


def _register(
    registry: str, name: str, files: Path, tags: dict[str, str], experiment: str = "0"
) -> str:
    """A version as a training pipeline registers one: the model's files logged as a run's
    artifacts, the version's source `runs:/RUN/model`."""
    mlflow = MlflowClient(tracking_uri=registry)
    run = mlflow.create_run(experiment)
    mlflow.log_artifacts(run.info.run_id, str(files), "model")
    if not mlflow.search_registered_models(f"name = '{name}'"):
        mlflow.create_registered_model(name)
    source = f"runs:/{run.info.run_id}/model"
    return mlflow.create_model_version(name, source, run.info.run_id, tags=tags).version


@pytest.mark.parametrize(
    "change",
    ["unsigned", "wrong-secret", "stale", "future", "tampered", "bad-id"],
)
def test_refused_deliveries_are_401_and_start_nothing(hook_stack, change):
    payload = created("support-refused", "1", {"fapm.prune": "true"})
    kwargs: dict = {}
    if change == "unsigned":
        kwargs["secret"] = None
    elif change == "wrong-secret":
        kwargs["secret"] = SECRET + "x"
    elif change == "stale":
        kwargs["stamp"] = int(time.time()) - 400  # well past the 300 s window
    elif change == "future":
        kwargs["stamp"] = int(time.time()) + 400  # +301 raced the clock in CI
    elif change == "tampered":
        kwargs["body"] = json.dumps(created("support-other", "1")).encode()
    else:
        kwargs["delivery"] = "../x"
    response = deliver(hook_stack, payload, **kwargs)
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "unauthorized"
    assert _jobs(hook_stack, "support-refused") == []


def test_replayed_delivery_is_401(hook_stack):
    delivery = str(uuid.uuid4())
    stamp = int(time.time())
    payload = {**created("x", "1"), "entity": "prompt"}  # signed, and ignored
    first = deliver(hook_stack, payload, delivery=delivery, stamp=stamp)
    assert first.status_code == 202 and first.json() == {
        "ignored": "event prompt.created starts no job"
    }
    again = deliver(hook_stack, payload, delivery=delivery, stamp=stamp)
    assert again.status_code == 401
    assert "Replayed" in again.json()["detail"]


def test_signed_garbage_is_422(hook_stack):
    for payload in ({"entity": "model_version"}, created("bad/name", "1"), created("a", "x1")):
        response = deliver(hook_stack, payload)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")


def test_mlflow_delivers_a_new_version_and_it_starts_one_job(
    hook_stack, registry, service_pair, monkeypatch
):
    """The registry itself calls the API: a version created with fapm.prune=true starts one job
    that reads the version's files; setting another tag on it (a second event) starts nothing
    more."""
    name = f"support-{uuid.uuid4().hex[:6]}"
    mlflow = MlflowClient(tracking_uri=registry)
    webhook = mlflow.create_webhook(
        name=f"fapm-{name}",
        url=f"{hook_stack.api_url}/v1/hooks/mlflow",
        events=["model_version.created", "model_version_tag.set"],
        secret=SECRET,
    )
    try:
        version = _register(registry, name, service_pair.finetuned, {"fapm.prune": "true"})
        jobs = _wait_for_jobs(hook_stack, name, 1)
        record = jobs[0]
        assert record.labels == {
            "source": "mlflow",
            "mlflow_model": name,
            "mlflow_version": version,
            "from": f"mlflow-{version}",
        }
        spec = JobSpec.model_validate(record.spec)
        # Where MLflow's own client says the version's files are, read as a local path.
        download = mlflow.get_model_version_download_uri(name, version)  # runs:/RUN/model
        monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
        underlying = RunsArtifactRepository.get_underlying_uri(download)
        assert spec.finetuned == underlying.removeprefix("file://")
        assert sorted(p.name for p in Path(spec.finetuned).iterdir()) == sorted(
            p.name for p in service_pair.finetuned.iterdir()
        )
        assert spec.output == f"mlflow://{name}"
        assert spec.mlflow is not None and spec.mlflow.alias == "pruned"
        assert (spec.method, spec.sparsity) == ("magnitude", 0.5)

        mlflow.set_model_version_tag(name, version, "reviewed", "yes")
        time.sleep(3)  # the tag event is delivered (and answered duplicate) meanwhile
        assert [j.id for j in _jobs(hook_stack, name)] == [record.id]
    finally:
        mlflow.delete_webhook(webhook.webhook_id)

    # The same version through a direct, signed delivery: the first job again.
    again = deliver(hook_stack, created(name, version, {"fapm.prune": "true"}))
    assert again.status_code == 202
    assert again.json() == {"job_id": record.id, "status": "queued", "duplicate": True}


def _wait_for_jobs(stack: LocalStack, name: str, count: int, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = _jobs(stack, name)
        if len(jobs) >= count:
            return jobs
        time.sleep(0.2)
    raise AssertionError(f"no job for {name} after {timeout:.0f} s")


def test_versions_without_the_tag_or_published_by_fapm_start_nothing(
    hook_stack, registry, service_pair
):
    name = f"support-{uuid.uuid4().hex[:6]}"
    plain = _register(registry, name, service_pair.finetuned, {})
    answer = deliver(hook_stack, created(name, plain))
    assert answer.status_code == 202
    assert answer.json() == {"ignored": f"{name} version {plain} lacks the tags fapm.prune=true"}

    # Tags sent in the payload are not trusted: the registry's own tags decide.
    assert "ignored" in deliver(hook_stack, created(name, plain, {"fapm.prune": "true"})).json()

    ours = _register(
        registry, name, service_pair.finetuned, {"fapm.prune": "true", "fapm.job_id": "j1"}
    )
    answer = deliver(hook_stack, created(name, ours))
    assert answer.json() == {"ignored": f"{name} version {ours} was registered by fapm (job j1)"}

    other = deliver(hook_stack, created("other-model", "1"))
    assert other.json() == {"ignored": "no rule matches model_version.created of other-model"}
    assert _jobs(hook_stack, name) == []


def test_a_version_whose_files_the_tenant_may_not_read_is_refused(hook_stack, registry, tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "config.json").write_text("{}")
    mlflow = MlflowClient(tracking_uri=registry)
    # An experiment whose artifacts lie outside FAPM_LOCAL_ROOTS.
    experiment = mlflow.create_experiment(
        f"outside-{uuid.uuid4().hex[:6]}", artifact_location=str(tmp_path / "elsewhere")
    )
    name = f"support-{uuid.uuid4().hex[:6]}"
    version = _register(registry, name, tmp_path / "files", {"fapm.prune": "true"}, experiment)
    response = deliver(hook_stack, created(name, version))
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_location"
    assert response.json()["errors"][0]["field"] == "finetuned"


def test_mlflow_outputs_follow_the_tenant_write_lists(tmp_path):
    locations = tmp_path / "locations.yaml"
    locations.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "acme": {"read": [str(tmp_path)], "write": ["mlflow://acme-*"]},
                    "bob": {"read": [str(tmp_path)], "write": ["mlflow://bob-model"]},
                    "any": {"read": [str(tmp_path)], "write": ["mlflow://*"]},
                }
            }
        )
    )
    settings = Settings(tenant_locations_file=locations, local_roots=[])
    (tmp_path / "b").mkdir()
    (tmp_path / "f").mkdir()

    def problems(tenant: str, output: str) -> list[str]:
        spec = JobSpec(base=str(tmp_path / "b"), finetuned=str(tmp_path / "f"), output=output)
        return [p.field for p in check_job_locations(spec, tenant, settings)]

    assert problems("acme", "mlflow://acme-support") == []
    assert problems("acme", "mlflow://bob-model") == ["output"]
    assert problems("bob", "mlflow://bob-model") == []
    assert problems("bob", "mlflow://bob-model-2") == ["output"]
    assert problems("any", "mlflow://whatever") == []
    assert problems("nobody", "mlflow://acme-support") == ["base", "finetuned", "output"]
    spec = JobSpec(base="mlflow://acme-a", finetuned=str(tmp_path / "f"), output="mlflow://acme-b")
    assert [p.field for p in check_job_locations(spec, "acme", settings)] == ["base"]


def test_job_record_through_the_api(hook_stack):
    # The job API shows an mlflow output and section as submitted (tenant-scoped like any job).
    with client(hook_stack, "alice") as http:
        response = http.post(
            "/v1/jobs",
            json={
                "base": "/nonexistent-root/b",
                "finetuned": "/nonexistent-root/f",
                "output": "mlflow://support-bot",
                "mlflow": {"alias": "latest"},
            },
        )
    assert response.status_code == 422
    assert any(e["field"].startswith("mlflow") for e in response.json()["errors"])
