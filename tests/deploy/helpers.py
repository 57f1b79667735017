"""Loading the deployment files, and the facts about the service that they must agree with."""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "deploy" / "schemas"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))

# Environment variables the deployment may set that are not fapm Settings: each one is read by
# something named here.
OTHER_ENV = {
    "UVICORN_WORKERS": "uvicorn (API worker processes)",
    "AWS_ENDPOINT_URL": "boto3/botocore (S3)",
    "AWS_ACCESS_KEY_ID": "boto3/botocore (S3)",
    "AWS_SECRET_ACCESS_KEY": "boto3/botocore (S3)",
    "AWS_DEFAULT_REGION": "boto3/botocore (S3)",
    "HF_TOKEN": "huggingface_hub",
    "HF_ENDPOINT": "huggingface_hub",
    "HF_HUB_CACHE": "huggingface_hub",
    "REDIS_PASSWORD": "the manifests ($(REDIS_PASSWORD) in FAPM_REDIS_URL) and KEDA",
    "REDISCLI_AUTH": "redis-cli in the Redis probes",
    "WORKER_DRAIN_SECONDS": "docker/worker_entrypoint.py",
    "MINIO_ROOT_USER": "MinIO",
    "MINIO_ROOT_PASSWORD": "MinIO",
    "FAPM_BUCKET": "the minio-init script in docker-compose.yml (creates the bucket)",
}
# Containers whose environment belongs to third-party images, not to fapm.
FOREIGN_CONTAINERS = {"minio", "minio-init", "redis"}


def settings_env_names() -> set[str]:
    """FAPM_* names of every field of the service's Settings."""
    from app.core.config import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def settings_defaults() -> dict[str, Any]:
    from app.core.config import Settings

    return {name: field.default for name, field in Settings.model_fields.items()}


def celery_queues() -> tuple[str, ...]:
    """The prune-job queues (KEDA scales on these)."""
    from worker.celery_app import QUEUES

    return tuple(QUEUES)


def all_celery_queues() -> set[str]:
    """Every queue the service routes to: prune jobs and webhook deliveries."""
    from worker.celery_app import celery_app

    return {queue.name for queue in celery_app.conf.task_queues}


def consumed_queues(argv: list[str]) -> set[str]:
    """The queues a `celery ... worker` command line names with -Q (none: the worker's default)."""
    for flag in ("-Q", "--queues"):
        if flag in argv:
            return set(argv[argv.index(flag) + 1].split(","))
    return set()


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def manifest_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


@cache
def _documents(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc)


def documents(path: Path) -> list[dict[str, Any]]:
    return list(_documents(path))


def applied_resources() -> list[dict[str, Any]]:
    """Every resource that `kubectl apply -k deploy/k8s` applies."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in documents(K8S / name)]


def resources(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in applied_resources() if d["kind"] == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container_command(container: dict[str, Any], image_entrypoint: list[str]) -> list[str]:
    """What the container runs: its command, else the image's entrypoint, then its args."""
    command = container.get("command", image_entrypoint)
    return [*command, *container.get("args", [])]


# -- Dockerfiles -----------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    out = []
    for line in logical:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def exec_form(argument: str) -> list[str]:
    """A JSON-array (exec form) CMD/ENTRYPOINT, or the shell form split like a shell."""
    import json

    argument = argument.strip()
    if argument.startswith("["):
        return json.loads(argument)
    return shlex.split(argument)


def final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(path)
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def image_command(path: Path) -> tuple[list[str], list[str]]:
    """(ENTRYPOINT, CMD) of the image's final stage."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for word, rest in final_stage(path):
        if word == "ENTRYPOINT":
            entrypoint = exec_form(rest)
        elif word == "CMD":
            cmd = exec_form(rest)
    return entrypoint, cmd


def duration_seconds(text: str | int) -> float:
    """Compose durations: 30s, 2h, 1h30m, 90 (seconds)."""
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)
