"""docker/worker_entrypoint.py with a real Celery worker and a real redis-server: on SIGTERM the
running job either finishes, or, past WORKER_DRAIN_SECONDS, goes back on its queue at once.

The Celery app is a stand-in with the service's long-job settings (celery_probe_app.py), so the
test needs no model; the worker is started exactly as the images start it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.helpers import DOCKER, ROOT

ENTRYPOINT = DOCKER / "worker_entrypoint.py"
QUEUE = "probe"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is missing: run scripts/setup"
    import redis

    port = _free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                server.kill()
                raise
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        server.terminate()
        server.wait(10)


def _start_worker(
    redis_url: str, tmp_path: Path, drain: str | None, cold: str | None = None
) -> subprocess.Popen:
    env = {**os.environ, "PROBE_BROKER_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    env.pop("WORKER_DRAIN_SECONDS", None)
    env.pop("WORKER_COLD_SHUTDOWN_SECONDS", None)
    if drain is not None:
        env["WORKER_DRAIN_SECONDS"] = drain
    if cold is not None:
        env["WORKER_COLD_SHUTDOWN_SECONDS"] = cold
    argv = [sys.executable, str(ENTRYPOINT), sys.executable, "-m", "celery"]
    argv += ["-A", "tests.deploy.celery_probe_app", "worker", "-Q", QUEUE, "--concurrency", "1"]
    argv += ["--without-mingle", "--without-gossip", "--loglevel", "INFO"]
    log = (tmp_path / "worker.log").open("wb")
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _run_until_taken(
    redis_url: str,
    worker: subprocess.Popen,
    seconds: float,
    marker: Path,
    task: str = "probe.sleep",
):
    """Send one job; return once the worker holds it (delivered, unacknowledged)."""
    import redis
    from celery import Celery

    sender = Celery("sender", broker=redis_url)
    sender.send_task(task, args=[seconds, str(marker)], queue=QUEUE)
    sender.close()
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 60
    while not (client.llen(QUEUE) == 0 and client.hlen("unacked") == 1):
        assert worker.poll() is None, "the worker exited"
        assert time.monotonic() < deadline, "the worker never took the job"
        time.sleep(0.1)
    time.sleep(0.5)  # let the pool process start the task
    return client


def _log(tmp_path: Path) -> str:
    return (tmp_path / "worker.log").read_text(errors="replace")


@pytest.mark.slow
def test_sigterm_lets_the_running_job_finish(redis_url: str, tmp_path: Path) -> None:
    worker = _start_worker(redis_url, tmp_path, drain=None)
    marker = tmp_path / "finished"
    try:
        client = _run_until_taken(redis_url, worker, 3.0, marker)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, _log(tmp_path)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert marker.read_text() == "done", "the job ran to its end after SIGTERM"
    assert client.llen(QUEUE) == 0 and client.hlen("unacked") == 0, "acknowledged, not re-queued"
    assert "warm shutdown" in _log(tmp_path).lower()


@pytest.mark.slow
def test_past_the_drain_deadline_the_job_goes_back_on_its_queue(
    redis_url: str, tmp_path: Path
) -> None:
    worker = _start_worker(redis_url, tmp_path, drain="1")
    marker = tmp_path / "finished"
    try:
        client = _run_until_taken(redis_url, worker, 120.0, marker)
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        took = time.monotonic() - started
    finally:
        if worker.poll() is None:
            worker.kill()
    log = _log(tmp_path)
    assert took < 30, log
    assert not marker.exists(), "the job was stopped, not finished"
    # Back on the queue now, for the next worker; nothing left waiting for a visibility timeout.
    assert client.llen(QUEUE) == 1, log
    assert client.hlen("unacked") == 0, log
    assert "drain deadline" in log and "cold shutdown" in log.lower()


@pytest.mark.slow
def test_a_cold_shutdown_that_does_not_end_is_cut_short_with_sigkill(
    redis_url: str, tmp_path: Path
) -> None:
    """A pool process that ignores SIGTERM holds Celery's cold shutdown forever: the entrypoint
    kills the worker's process group WORKER_COLD_SHUTDOWN_SECONDS after the SIGQUIT. The
    message stays unacknowledged (fapm's sweeper puts such a job back, see
    tests/service/test_worker_recovery.py)."""
    worker = _start_worker(redis_url, tmp_path, drain="1", cold="2")
    marker = tmp_path / "finished"
    try:
        client = _run_until_taken(redis_url, worker, 120.0, marker, task="probe.stubborn")
        group = _group_members(worker.pid)
        assert len(group) >= 2, "the Celery main process and its pool process"
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
        took = time.monotonic() - started
    finally:
        if worker.poll() is None:
            worker.kill()
    log = _log(tmp_path)
    assert code == 128 + signal.SIGKILL, log
    assert 3 <= took < 20, log  # 1 s of drain, 2 s of cold shutdown, then the kill
    assert "did not end in 2 s: killing the worker" in log
    assert not marker.exists()
    deadline = time.monotonic() + 10
    while _alive(group):
        assert time.monotonic() < deadline, f"left running: {_alive(group)}"
        time.sleep(0.1)
    assert client.hlen("unacked") == 1, "left for the sweeper, not acknowledged"


def _group_members(entrypoint_pid: int) -> list[int]:
    """The worker's processes: its own process group, led by the entrypoint's child."""
    (leader,) = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _ppid(int(p.name)) == entrypoint_pid
    ]
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _pgid(int(p.name)) == leader
    ]


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return []


def _ppid(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def _pgid(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[2]) if fields else None


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if _stat(pid) and _stat(pid)[0] != "Z"]


def test_entrypoint_passes_the_exit_status_through(tmp_path: Path) -> None:
    for code in (0, 3):
        result = subprocess.run(
            [sys.executable, str(ENTRYPOINT), sys.executable, "-c", f"raise SystemExit({code})"],
            timeout=30,
        )
        assert result.returncode == code
    result = subprocess.run([sys.executable, str(ENTRYPOINT)], capture_output=True, timeout=30)
    assert result.returncode == 2
