"""output mlflow://NAME against a real MLflow tracking server (SQLite backend; artifacts on moto
S3 and on local disk): the version registered from the staged files, its tags and alias, a
re-run finding its own version, a cancelled job registering nothing.

`start_mlflow_server` is also used by tests/service/test_mlflow_hooks.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from worker.localstack import Process, free_port, wait_for_port


def start_mlflow_server(
    workdir: Path, artifact_root: str, env: dict[str, str]
) -> tuple[Process, str]:
    """`mlflow server` on a free loopback port with a SQLite store; artifacts are written by the
    clients straight to `artifact_root` (--no-serve-artifacts), so versions' sources are
    s3:// or local paths. Webhooks may go to loopback http (the API under test)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    binary = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    argv = [binary, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    argv += ["--backend-store-uri", f"sqlite:///{workdir}/mlflow.db"]
    argv += ["--default-artifact-root", artifact_root, "--no-serve-artifacts"]
    child_env = {
        **os.environ,
        **env,
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_CACHE_TTL": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    log = workdir / "mlflow.log"
    popen = subprocess.Popen(
        argv,
        env=child_env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    process = Process("mlflow", popen, log)
    try:
        wait_for_port(port, 120, popen)
    except Exception:
        process.stop()
        raise RuntimeError(log.read_text()[-3000:]) from None
    return process, f"http://127.0.0.1:{port}"


# -- publishing to the registry -----------------------------------------------------------------

import hashlib  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import boto3  # noqa: E402
import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from worker.engine.pipeline import run_prune  # noqa: E402
from worker.errors import JobCancelled  # noqa: E402
from worker.io.mlflow_registry import JOB_TAG, version_tags  # noqa: E402
from worker.spec import JobSpec  # noqa: E402


@pytest.fixture(scope="module")
def s3_registry(tmp_path_factory, s3_endpoint) -> Iterator[str]:
    """An MLflow server whose runs keep their artifacts on (moto) S3."""
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    env = {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    process, url = start_mlflow_server(
        tmp_path_factory.mktemp("mlflow_s3"), f"s3://{bucket}/mlflow", env
    )
    try:
        yield url
    finally:
        process.stop()


@pytest.fixture
def registry_env(monkeypatch, s3_registry, s3_endpoint) -> MlflowClient:
    monkeypatch.setenv("FAPM_MLFLOW_TRACKING_URI", s3_registry)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("FAPM_MLFLOW_EXPERIMENT", "fapm-tests")
    return MlflowClient(tracking_uri=s3_registry)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _job_versions(mlflow: MlflowClient, name: str, job_id: str) -> list:
    return mlflow.search_model_versions(f"name = '{name}' and tags.`{JOB_TAG}` = '{job_id}'")


def test_a_job_registers_one_version_with_its_files_tags_and_alias(
    registry_env, bf16_pair, tmp_path
):
    mlflow = registry_env
    name = f"support-{uuid.uuid4().hex[:6]}"
    fields = {"base": str(bf16_pair.base), "finetuned": str(bf16_pair.finetuned)}
    fields |= {"method": "magnitude", "sparsity": 0.75}
    job_id = uuid.uuid4().hex
    spec = JobSpec(**fields, output=f"mlflow://{name}", mlflow={"alias": "pruned"})
    result = run_prune(spec, job_id=job_id)
    assert result.output == f"models:/{name}/1"

    versions = _job_versions(mlflow, name, job_id)
    assert len(versions) == 1
    version = versions[0]
    assert version.source.startswith("s3://mlflow-")  # the run's artifacts on S3
    assert mlflow.get_model_version_by_alias(name, "pruned").version == version.version
    assert version.tags == {
        JOB_TAG: job_id,
        "fapm.method": "magnitude",
        "fapm.sparsity": "0.75",
        "fapm.scope": "tensor",
        "fapm.base": bf16_pair.base.as_uri(),  # local inputs have no revision to tag
        "fapm.finetuned": bf16_pair.finetuned.as_uri(),
    }

    # The registered files are those a local output of the same job holds, byte for byte.
    reference = run_prune(JobSpec(**fields, output=str(tmp_path / "ref")))
    downloaded = Path(mlflow.download_artifacts(version.run_id, "model", str(tmp_path / "dl")))
    local_shards = sorted(p.name for p in (tmp_path / "ref").glob("*.safetensors"))
    assert local_shards and sorted(p.name for p in downloaded.glob("*.safetensors")) == local_shards
    for shard in local_shards:
        assert _sha(downloaded / shard) == _sha(tmp_path / "ref" / shard)
    assert (downloaded / "config.json").read_bytes() == (
        tmp_path / "ref" / "config.json"
    ).read_bytes()
    assert reference.report["totals"] == result.report["totals"]

    # A re-run of the job (its worker was killed before the job was marked done) finds its version.
    again = run_prune(spec, job_id=job_id)
    assert again.report["job_id"] == job_id
    assert len(_job_versions(mlflow, name, job_id)) == 1
    assert len(mlflow.search_model_versions(f"name = '{name}'")) == 1


def test_a_cancelled_job_registers_nothing(registry_env, bf16_pair):
    mlflow = registry_env
    name = f"support-{uuid.uuid4().hex[:6]}"
    job_id = uuid.uuid4().hex
    spec = JobSpec(
        base=str(bf16_pair.base),
        finetuned=str(bf16_pair.finetuned),
        output=f"mlflow://{name}",
        sparsity=0.5,
    )
    calls = 0

    def cancel_after_planning() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    with pytest.raises(JobCancelled):
        run_prune(spec, should_cancel=cancel_after_planning, job_id=job_id)
    assert _job_versions(mlflow, name, job_id) == []
    experiment = mlflow.get_experiment_by_name("fapm-tests")
    assert mlflow.search_runs([experiment.experiment_id], f"tags.`{JOB_TAG}` = '{job_id}'") == []


def test_version_tags_carry_the_evaluation():
    report = {
        "job_id": "j",
        "spec": {"method": "fapm", "sparsity": 0.9, "scope": "tensor"},
        "inputs": {
            "base": {"uri": "hf://org/base", "revision": "a" * 40},
            "adapter": {"uri": "s3://b/lora/", "revision": None},
        },
        "evaluation": {"chosen": {"skill_kept": 0.9612345678, "forgetting_left": 0.25}},
    }
    assert version_tags(report) == {
        JOB_TAG: "j",
        "fapm.method": "fapm",
        "fapm.sparsity": "0.9",
        "fapm.scope": "tensor",
        "fapm.base": "hf://org/base",
        "fapm.base_revision": "a" * 40,
        "fapm.adapter": "s3://b/lora/",
        "fapm.skill_kept": "0.961235",
        "fapm.forgetting_left": "0.25",
    }
