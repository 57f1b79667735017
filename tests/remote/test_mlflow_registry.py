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
