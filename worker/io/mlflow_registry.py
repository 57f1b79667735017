"""Publishing to an MLflow Model Registry: `output: mlflow://<registered model name>`.

The job's files become the artifacts (under `model/`) of a run in the experiment
FAPM_MLFLOW_EXPERIMENT (default `fapm`), logged file by file from the staging directory as each
shard completes (MLflow's artifact repositories stream a file from disk; nothing is held in
memory), and `commit` registers them as a new version of the model with tags that say what it
is (FAPM_TAGS) and, if the job asks, moves an alias to it. The version is the commit point: a
failed or cancelled job deletes its run and registers nothing.

A re-run of a job whose worker was killed finds what that attempt did by the `fapm.job_id` tag:
a version it registered is the job's result (`published_report`); runs it left without a version
are deleted before the new attempt logs its own.

The client is MLflow's (`mlflow-skinny`, the `mlflow` extra the worker image installs), with
MLflow's own configuration: MLFLOW_TRACKING_URI (or FAPM_MLFLOW_TRACKING_URI),
MLFLOW_TRACKING_TOKEN or _USERNAME/_PASSWORD, and the artifact store's credentials (AWS_*).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from worker.errors import AccessDenied, FapmError, SourceUnavailable
from worker.io.publish import (
    OutputTarget,
    _BackgroundUploads,
    _published_json,
    _read_no_follow,
    staged_files,
)
from worker.io.scratch import ScratchDir
from worker.io.writer import WrittenShard

JOB_TAG = "fapm.job_id"
ARTIFACT_DIR = "model"
DEFAULT_EXPERIMENT = "fapm"
REPORT_FILE = "pruning_report.json"


def _client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=os.environ.get("FAPM_MLFLOW_TRACKING_URI") or None)


def _registry_error(exc: Exception, where: str) -> FapmError:
    """An MLflow failure as a job error with a stable code."""
    code = str(getattr(exc, "error_code", ""))
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or "403" in code or "401" in code:
        return AccessDenied(f"{where}: MLflow refused the request ({code}); check the token")
    return SourceUnavailable(f"{where}: MLflow failed: {exc}")


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_version(client, name: str, job_id: str):
    """The version of `name` that job `job_id` registered, or None."""
    versions = client.search_model_versions(
        f"name = {_quoted(name)} and tags.`{JOB_TAG}` = {_quoted(job_id)}"
    )
    return versions[0] if versions else None


def version_tags(report: dict) -> dict[str, str]:
    """What a registered version says about itself: its inputs (URIs and revisions), method,
    sparsity, job and, when the job evaluated, the skill kept and the forgetting left."""
    spec = report.get("spec") or {}
    inputs = report.get("inputs") or {}
    tags: dict[str, Any] = {
        # Also on versions `fapm prune` registers: the webhook never prunes fapm's own results.
        JOB_TAG: report.get("job_id") or "local",
        "fapm.method": spec.get("method"),
        "fapm.sparsity": spec.get("sparsity"),
        "fapm.scope": spec.get("scope"),
    }
    for role in ("base", "finetuned", "adapter"):
        identity = inputs.get(role)
        if isinstance(identity, dict):
            tags[f"fapm.{role}"] = identity.get("uri")
            tags[f"fapm.{role}_revision"] = identity.get("revision")
    chosen = (report.get("evaluation") or {}).get("chosen") or {}
    for key in ("skill_kept", "forgetting_left"):
        if chosen.get(key) is not None:
            tags[f"fapm.{key}"] = f"{chosen[key]:.6g}"
    return {k: str(v) for k, v in tags.items() if v is not None}


class MlflowTarget(OutputTarget):
    """A new version of a registered model, logged from the staging directory."""

    def __init__(self, uri: str, name: str, job_id: str | None, client=None) -> None:
        self.uri = uri
        self.name = name
        self.job_id = job_id
        self.client = client or _client()
        try:
            experiment = self._experiment_id()
            if job_id is not None:
                self._delete_dead_attempts(experiment, job_id)
            tags = {JOB_TAG: job_id} if job_id else {}
            self.run = self.client.create_run(experiment, tags=tags, run_name=f"fapm {name}")
        except FapmError:
            raise
        except Exception as exc:
            raise _registry_error(exc, uri) from exc
        self.run_id = self.run.info.run_id
        self._scratch = ScratchDir("out")  # swept if this process is killed
        self.local_dir = self._scratch.path
        self._uploads = _BackgroundUploads()
        self._logged: set[str] = set()
        self._registered = False

    def _experiment_id(self) -> str:
        name = os.environ.get("FAPM_MLFLOW_EXPERIMENT") or DEFAULT_EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created by another worker meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _delete_dead_attempts(self, experiment: str, job_id: str) -> None:
        """Runs an earlier attempt of this job left without a version (it was killed)."""
        runs = self.client.search_runs([experiment], f"tags.`{JOB_TAG}` = {_quoted(job_id)}")
        registered = find_version(self.client, self.name, job_id)
        for run in runs:
            if registered is None or registered.run_id != run.info.run_id:
                self.client.delete_run(run.info.run_id)

    def _log(self, name: str, remove_local: bool) -> None:
        path = self.local_dir / name
        folder = "/".join([ARTIFACT_DIR, *name.split("/")[:-1]])
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)
        self._logged.add(name)
        if remove_local:
            path.unlink()  # local disk holds about one shard at a time

    def shard_done(self, shard: WrittenShard) -> None:
        self._uploads.submit(self._log, shard.file, True)

    @property
    def upload_seconds(self) -> float:  # type: ignore[override]
        return self._uploads.seconds

    def commit(self, message: str) -> str:
        try:
            report = _published_json(_read_no_follow(self.local_dir / REPORT_FILE), REPORT_FILE)
            self._uploads.wait()
            for name in staged_files(self.local_dir):  # nested files (carried folders) too
                if name not in self._logged:
                    self._uploads.submit(self._log, name, False)
            self._uploads.wait()
            version = self._register(message, version_tags(report))
            self._registered = True  # from here on the run holds a version: never deleted
            alias = ((report.get("spec") or {}).get("mlflow") or {}).get("alias")
            if alias:
                self.client.set_registered_model_alias(self.name, alias, version.version)
            self.client.set_terminated(self.run_id, "FINISHED")
        except FapmError:
            raise
        except Exception as exc:
            raise _registry_error(exc, self.uri) from exc
        self._scratch.remove()
        return f"models:/{self.name}/{version.version}"

    def _register(self, message: str, tags: dict[str, str]):
        from mlflow.exceptions import MlflowException

        if self.job_id is not None:  # registered by this attempt's commit, then it failed
            existing = find_version(self.client, self.name, self.job_id)
            if existing is not None:
                return existing
        try:
            self.client.create_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return self.client.create_model_version(
            self.name,
            source=f"{self.run.info.artifact_uri.rstrip('/')}/{ARTIFACT_DIR}",
            run_id=self.run_id,
            tags=tags,
            description=message,
        )

    def abort(self) -> None:
        self._uploads.cancel()
        try:
            if not self._registered:
                self.client.set_terminated(self.run_id, "FAILED")
                self.client.delete_run(self.run_id)
        except Exception:
            pass
        finally:
            self._scratch.remove()


def published_version_report(name: str, job_id: str, client=None) -> dict | None:
    """The report of the version job `job_id` registered in `name` (its worker died after
    registering, before the job was marked done), else None."""
    client = client or _client()
    version = find_version(client, name, job_id)
    if version is None:
        return None
    with tempfile.TemporaryDirectory(prefix="fapm-report-") as scratch:
        path = client.download_artifacts(version.run_id, f"{ARTIFACT_DIR}/{REPORT_FILE}", scratch)
        return _published_json(_read_no_follow(Path(path)), REPORT_FILE)
