"""Jobs through the API of the running Compose stack (scripts/containers brings it up and down).

    python3 docker/local/stack_check.py --project fapm-local

With DOCKER_HOST at podman's socket and the podman configuration scripts/containers exports:
1. a tiny model pair is made in the stack (`python -m worker.demo make-pair`, in a worker);
2. a job with a file:// output succeeds and its output loads with transformers;
3. a job with an s3:// output (moto's server, in place of MinIO) succeeds and its files are there;
4. with the CPU worker stopped, a job is queued, Redis is restarted (`docker-compose restart`):
   the record and the queued message are still there (AOF on a volume), and the job succeeds
   once the worker is back;
5. a job is parked mid-run (leased, FAPM_TEST_PAUSE_DIR), its worker container is killed
   (`podman kill`) and replaced by a new one, where the job runs again and succeeds.
Standard library only; exits non-zero at the first check that fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

API_KEY = "local-dev-key"  # docker-compose.yml's default for tenant `local`
FILES = ["-f", "docker-compose.yml", "-f", "docker/compose.local.yml"]


class Stack:
    def __init__(self, project: str) -> None:
        self.project = project
        self.api = ""

    def compose(self, *args: str) -> str:
        return run("docker-compose", "-p", self.project, *FILES, *args)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def exec(self, service: str, *command: str) -> str:
        return run("podman", "exec", self.container(service), *command)

    def connect(self) -> None:
        # An internal network publishes no port: the API is reached at its container's address.
        address = run(
            "podman",
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            self.container("api"),
        ).strip()
        self.api = f"http://{address}:8000"

    def http(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            self.api + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.http("GET", "/readyz")
                return
            except (urllib.error.URLError, OSError) as error:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the API was not ready in {timeout:g} s") from error
                time.sleep(1)

    def submit(self, output: str) -> str:
        record = self.http(
            "POST",
            "/v1/jobs",
            {
                "base": "file:///data/demo/base",
                "finetuned": "file:///data/demo/finetuned",
                "output": output,
                "method": "fapm",
                "sparsity": 0.9,
            },
        )
        return str(record["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.http("GET", f"/v1/jobs/{job_id}"))

    def wait_job(self, job_id: str, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                record = self.job(job_id)
            except (urllib.error.URLError, OSError):
                record = {"status": "unreachable"}
            if record["status"] in ("succeeded", "failed", "cancelled"):
                assert record["status"] == "succeeded", json.dumps(record, indent=1)
                return record
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not done in {timeout:g} s: {record}")
            time.sleep(0.5)


def run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)}: exit {result.returncode}\n{result.stderr}")
    return result.stdout


def say(message: str) -> None:
    print(f"  {message}", flush=True)


def file_output(stack: Stack) -> None:
    job_id = stack.submit("file:///data/out/file")
    record = stack.wait_job(job_id)
    assert record["attempts"] == 1, record
    checked = stack.exec("worker-cpu", "python", "-m", "worker.demo", "check", "/data/out/file")
    say(f"file:// job {job_id} succeeded: {checked.strip()}")


def s3_output(stack: Stack) -> None:
    job_id = stack.submit("s3://fapm/out/s3")
    assert stack.wait_job(job_id)["attempts"] == 1
    listing = stack.exec(
        "worker-cpu",
        "python",
        "-c",
        "import boto3; print('\\n'.join(o['Key'] for o in boto3.client('s3')"
        ".list_objects_v2(Bucket='fapm', Prefix='out/s3/')['Contents']))",
    ).split()
    names = {key.rsplit("/", 1)[-1] for key in listing}
    assert "pruning_report.json" in names and "config.json" in names, listing
    assert any(n.endswith(".safetensors") for n in names), listing
    say(f"s3:// job {job_id} succeeded: {len(listing)} objects in s3://fapm/out/s3/")


def redis_restart(stack: Stack) -> None:
    stack.compose("stop", "worker-cpu")
    job_id = stack.submit("file:///data/out/redis")
    assert stack.job(job_id)["status"] == "queued"
    assert stack.exec("redis", "redis-cli", "llen", "cpu").strip() == "1"
    time.sleep(2)  # past one AOF fsync (appendfsync everysec)
    stack.compose("restart", "redis")
    deadline = time.monotonic() + 60
    while True:
        try:
            if stack.exec("redis", "redis-cli", "ping").strip() == "PONG":
                break
        except AssertionError:
            pass
        assert time.monotonic() < deadline, "Redis did not come back"
        time.sleep(0.5)
    queued = stack.exec("redis", "redis-cli", "llen", "cpu").strip()
    assert queued == "1", f"the queued message was lost in the restart (llen cpu = {queued})"
    assert stack.job(job_id)["status"] == "queued"
    stack.compose("start", "worker-cpu")
    record = stack.wait_job(job_id)
    assert record["attempts"] == 1, record
    say(f"Redis restarted with job {job_id} queued: record and message kept, job succeeded")


def worker_killed(stack: Stack) -> None:
    stack.compose("stop", "worker-cpu")
    job_id = stack.submit("file:///data/out/killed")
    # The worker parks the job once it holds the lease (worker/tasks/run_job.py pause_for_test).
    stack.exec(
        "worker-webhooks",
        "sh",
        "-c",
        f"mkdir -p /data/pause && echo started > /data/pause/{job_id}.pause",
    )
    stack.compose("start", "worker-cpu")
    old = stack.container("worker-cpu")
    deadline = time.monotonic() + 180
    while subprocess.run(
        ["podman", "exec", old, "test", "-f", f"/data/pause/started-{job_id}"]
    ).returncode:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.5)
    assert stack.job(job_id)["status"] == "running"
    run("podman", "kill", old)
    killed = time.monotonic()
    stack.compose("up", "-d", "--no-deps", "--force-recreate", "worker-cpu")
    new = stack.container("worker-cpu")
    assert new != old
    record = stack.wait_job(job_id)
    assert record["attempts"] == 2, record
    stack.exec("worker-cpu", "python", "-m", "worker.demo", "check", "/data/out/killed")
    say(
        f"worker container {old[:12]} killed mid-job; job {job_id} succeeded in {new[:12]} "
        f"{time.monotonic() - killed:.1f} s later (attempts 2)"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", required=True)
    args = parser.parse_args(argv)
    stack = Stack(args.project)
    stack.connect()
    stack.wait_ready()
    stack.exec("worker-cpu", "python", "-m", "worker.demo", "make-pair", "/data/demo")
    for check in (file_output, s3_output, redis_restart, worker_killed):
        started = time.monotonic()
        check(stack)
        say(f"({check.__name__}: {time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
