"""A whole fapm-service on one machine, as child processes: redis-server, the API under uvicorn and
a Celery worker, each on a free loopback port.

One launcher serves `fapm demo`, the integration tests' fixtures and the submission benchmark, so
all three run the service exactly as a deployment does (real processes, real sockets). Nothing
here imports torch.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS settings that point boto3 at a local S3 endpoint with dummy keys."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def local_s3_client(endpoint: str):
    """A boto3 S3 client of the local endpoint, with the settings s3_env gives the workers."""
    import boto3  # only the S3 users of this module need it

    env = s3_env(endpoint)
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


@dataclass
class Process:
    """A child process in its own process group (so a kill reaches its children too)."""

    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole group (a Celery worker's pool children included)."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a Celery worker's warm shutdown), then SIGKILL after `timeout`."""
        self.kill(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.popen.wait(10)


def _spawn(name: str, argv: list[str], env: Mapping[str, str], log_dir: Path) -> Process:
    log = log_dir / f"{name}.log"
    handle = log.open("ab")
    popen = subprocess.Popen(
        argv,
        env=dict(env),
        stdout=handle,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    handle.close()
    return Process(name, popen, log)


@dataclass
class LocalStack:
    """Start with `start()`, stop with `stop()` (or use as a context manager)."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)  # extra FAPM_* settings for all processes
    worker_args: list[str] = field(default_factory=list)
    redis_port: int = 0
    api_port: int = 0
    s3_port: int = 0  # set by start_s3(): a moto S3 server that every child process is pointed at
    processes: list[Process] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def child_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env, "FAPM_REDIS_URL": self.redis_url}
        if self.s3_port:
            env.update(s3_env(self.s3_url))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start_redis(self) -> Process:
        self.redis_port = self.redis_port or free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        data = self.workdir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(data)]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "yes"]
        process = _spawn("redis", argv, os.environ, self.workdir)
        wait_for_port(self.redis_port, 15, process.popen)
        self.processes.append(process)
        return process

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start_s3(self) -> Process:
        """moto's standalone S3 server (the real S3 protocol on loopback), for tests and demos."""
        self.s3_port = self.s3_port or free_port()
        binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        argv = [binary, "-H", "127.0.0.1", "-p", str(self.s3_port)]
        process = _spawn("s3", argv, os.environ, self.workdir)
        wait_for_port(self.s3_port, 30, process.popen)
        self.processes.append(process)
        return process

    def api_argv(self) -> list[str]:
        """uvicorn as the images run it (request head capped in the parser), on api_port."""
        from app.api.header_limit import UVICORN_HTTP_ARGS  # the API's own imports, not torch

        argv = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1"]
        return [*argv, "--port", str(self.api_port), "--no-access-log", *UVICORN_HTTP_ARGS]

    def start_api(self, extra_env: Mapping[str, str] | None = None) -> Process:
        self.api_port = self.api_port or free_port()
        argv = self.api_argv()
        process = _spawn("api", argv, {**self.child_env(), **(extra_env or {})}, self.workdir)
        wait_for_port(self.api_port, 30, process.popen)
        self.processes.append(process)
        return process

    def start_worker(
        self,
        name: str = "worker",
        extra_args: list[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> Process:
        """A Celery worker process; returns once it has written its first heartbeat."""
        argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker"]
        argv += ["--hostname", f"{name}@%h", "--loglevel", "INFO"]
        argv += [*self.worker_args, *(extra_args or [])]
        process = _spawn(name, argv, {**self.child_env(), **(extra_env or {})}, self.workdir)
        self.processes.append(process)
        self._wait_for_heartbeat(f"{name}@", process)
        return process

    def _wait_for_heartbeat(self, prefix: str, process: Process, timeout: float = 120) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not process.alive():
                    raise RuntimeError(
                        f"{process.name} exited at start:\n{process.log.read_text()[-3000:]}"
                    )
                if any(h.startswith(prefix) for h in client.zrange("fapm:workers", 0, -1)):
                    return
                time.sleep(0.1)
        finally:
            client.close()
        raise TimeoutError(f"{process.name} wrote no heartbeat in {timeout:.0f} s")

    def start(self, workers: int = 1) -> LocalStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_redis()
        self.start_api()
        for i in range(workers):
            self.start_worker(f"worker{i}" if workers > 1 else "worker")
        return self

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
