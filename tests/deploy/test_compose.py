"""docker-compose.yml: valid against the Compose specification, and wired the way the service
works (settings names, queues, persistence, grace periods)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import yaml

from tests.deploy.helpers import (
    COMPOSE,
    FOREIGN_CONTAINERS,
    OTHER_ENV,
    ROOT,
    all_celery_queues,
    compose,
    consumed_queues,
    duration_seconds,
    settings_defaults,
    settings_env_names,
)

FAPM_SERVICES = ("api", "worker-cpu", "worker-gpu", "worker-webhooks")
WORKERS = ("worker-cpu", "worker-gpu", "worker-webhooks")


def test_valid_against_the_compose_spec_schema() -> None:
    # The Compose specification's JSON schema, as shipped by check-jsonschema (dev extra).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_docker_compose_config_parses_it() -> None:
    """`docker-compose config` (Debian's docker-compose 1.29) or `docker compose config`: no engine
    is needed to parse, interpolate and check the file. scripts/setup installs Debian's."""
    cli = _compose_cli()
    assert cli is not None, (
        "docker-compose is missing: run scripts/setup (apt-get install docker-compose)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAPM_", "MINIO_"))}
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE), "--profile", "gpu", "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert {"redis", "minio", "minio-init", *FAPM_SERVICES} <= set(rendered["services"])
    api_env = rendered["services"]["api"]["environment"]
    assert api_env["FAPM_REDIS_URL"] == "redis://redis:6379/0"
    assert api_env["FAPM_API_KEYS"]  # the local default, interpolated


def test_services_and_builds() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "minio", "minio-init", *FAPM_SERVICES}
    for name in FAPM_SERVICES:
        image = "worker-cpu" if name == "worker-webhooks" else name
        build = services[name]["build"]
        assert build["context"] == "."
        assert (ROOT / build["dockerfile"]).is_file()
        assert build["dockerfile"] == f"docker/{image}.Dockerfile"
        assert services[name]["image"].startswith(f"fapm-service/{image}:")


def test_every_environment_variable_is_read_by_something() -> None:
    fields = settings_env_names()
    for name, service in compose()["services"].items():
        if name in FOREIGN_CONTAINERS:
            continue
        for var in service.get("environment", {}):
            if var.startswith("FAPM_"):
                assert var in fields, f"{name}: {var} is not a Settings field"
            else:
                assert var in OTHER_ENV, f"{name}: {var} is read by nothing known"


def test_all_fapm_containers_share_redis_and_settings() -> None:
    services = compose()["services"]
    envs = [services[name]["environment"] for name in FAPM_SERVICES]
    for key in ("FAPM_REDIS_URL", "FAPM_VISIBILITY_TIMEOUT_SECONDS", "FAPM_LOCAL_ROOTS"):
        assert len({env[key] for env in envs}) == 1, key
    assert envs[0]["FAPM_REDIS_URL"].startswith("redis://redis:6379/")
    assert "FAPM_API_KEYS" in services["api"]["environment"]
    for name in FAPM_SERVICES:
        assert "fapm-data:/data" in services[name]["volumes"]


def test_redis_persists_with_aof_on_a_volume() -> None:
    redis = compose()["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "redis-data:/data" in redis["volumes"]
    assert "redis-data" in compose()["volumes"]
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_gpu_worker_is_a_profile_with_a_gpu_reservation() -> None:
    services = compose()["services"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name in ("redis", "minio", "minio-init", "api", "worker-cpu", "worker-webhooks"):
        assert "profiles" not in services[name], f"{name} starts with a plain `up`"


def test_minio_bucket_is_created_at_start_before_the_service() -> None:
    services = compose()["services"]
    init = services["minio-init"]
    assert init["image"].startswith("minio/mc:")
    script = "\n".join(init["command"])
    assert "mc alias set local http://minio:9000" in script and "mc mb --ignore-existing" in script
    for name in FAPM_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["minio-init"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
        assert services[name]["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"


def test_grace_periods_fit_the_visibility_timeout() -> None:
    services = compose()["services"]
    visibility = settings_defaults()["visibility_timeout_seconds"]
    for name in WORKERS:
        env = services[name]["environment"]
        grace = duration_seconds(services[name]["stop_grace_period"])
        drain = float(env["WORKER_DRAIN_SECONDS"])
        assert 0 < drain < grace, "the job is handed back before Docker's SIGKILL"
        assert grace - drain >= (60 if name != "worker-webhooks" else 10), "time to requeue"
        assert grace < int(env.get("FAPM_VISIBILITY_TIMEOUT_SECONDS", visibility))
    assert duration_seconds(services["api"]["stop_grace_period"]) <= 60


def test_workers_consume_every_queue_of_the_service() -> None:
    services = compose()["services"]
    consumed = {}
    for name in WORKERS:
        command = services[name]["command"]
        assert command[:4] == ["celery", "-A", "worker.celery_app", "worker"]
        consumed[name] = consumed_queues(command)
    assert consumed == {
        "worker-cpu": {"cpu"},
        "worker-gpu": {"gpu"},
        "worker-webhooks": {"webhooks"},
    }
    assert set().union(*consumed.values()) == all_celery_queues()


def test_api_is_on_localhost_8000() -> None:
    assert compose()["services"]["api"]["ports"] == ["127.0.0.1:8000:8000"]


LOCAL_OVERRIDE = ROOT / "docker" / "compose.local.yml"


def test_local_override_keeps_the_stack_offline_and_on_local_images() -> None:
    """docker/compose.local.yml (what scripts/containers runs): every image built here, one
    internal network, and the same services as the real file."""
    cli = _compose_cli()
    assert cli is not None, "docker-compose is missing: run scripts/setup"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAPM_", "MINIO_"))}
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE), "-f", str(LOCAL_OVERRIDE), "--profile", "gpu", "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert set(rendered["services"]) == set(compose()["services"])
    for name, service in rendered["services"].items():
        assert service["image"].startswith("localhost/"), name
    assert rendered["networks"]["default"]["internal"] is True
    # The persistence settings under test are the real file's, not the override's.
    assert rendered["services"]["redis"]["command"] == compose()["services"]["redis"]["command"]
    for name in ("worker-cpu", "worker-webhooks"):
        env_ = rendered["services"][name]["environment"]
        assert env_["FAPM_TEST_PAUSE_DIR"].startswith("/data/")
        assert int(env_["FAPM_LEASE_SECONDS"]) < 60
    assert "FAPM_TEST_PAUSE_DIR" not in str(compose()), "the real stack has no test hook"
