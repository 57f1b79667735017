"""The reliability and security campaign of issue 12, re-runnable: real processes on loopback
(redis-server with AOF as docker-compose.yml configures it, uvicorn, Celery workers; all started by
worker/localstack.py), counts as flags, a JSON summary on stdout and a Markdown table in a file.

Sections (each counts what was tried and what held; a section that crashes is recorded as such
and the campaign goes on):

  kill_midjob     a worker SIGKILLed (whole process group) mid-prune, N times: every job ends
                  succeeded, byte-identical to `fapm prune` (the CLI) on the same inputs, no partial
                  output ever visible at the output path (polled throughout), time to recovery;
  kill_instants   a worker killed at each instant run_job's test hook can pause at (taken, noted,
                  started, finished; FAPM_TEST_PAUSE_DIR), its pool process alone or the whole
                  worker: the job and its webhook both end, and how long that took;
  redis_restart   redis-server SIGTERMed and SIGKILLed with jobs queued and running: nothing lost,
                  every job ends, and what the API answered while Redis was down;
  kill_webhooks   the `-Q webhooks` worker SIGKILLed (whole process group) with POSTs held open by
                  the receiver and retries counting down after a 500, one job ending while no
                  webhooks worker lives, then a new one started: every webhook-id answered 200
                  exactly once at the receiver (duplicates counted), nothing left in
                  fapm:webhooks-owed, time to delivery after the kill and after the restart;
  kill_s3         a worker SIGKILLed mid-upload to moto_server (shards streaming from a local or
                  s3:// source, a multipart upload to staging, the promote's copies before the
                  manifest, a multipart copy to the output): every job succeeds with the bytes of
                  `fapm prune`, no staging object, open multipart upload or local scratch left,
                  and a manifest never listed before its objects (the output prefix polled);
  submissions     N submissions at once (exactly one job each, audited in Redis), idempotency keys
                  sent 2-5 times at once (one job per key), a burst against a quota (exactly the
                  limit accepted, the rest 429);
  security        probes, each counted refused/accepted: cross-tenant job routes and locations,
                  a root as output with overwrite, symlink escapes, SSRF addresses, s3/hf names,
                  regexes RE2 cannot run and a formerly catastrophic one, lone surrogates, huge
                  request heads, webhook URL token redaction (every log file and Redis value
                  searched), the Hub webhook's secret checked before its body;
  fuzz            the fuzz test's own generators (tests/integration/test_fuzz_inputs.py, imported):
                  safetensors headers, index/config/JSONL documents, typed vs untyped errors;
  schemathesis    the suite's slow schemathesis test (all checks), its printed case counts.

    .venv/bin/python bench/reliability_campaign.py --quick --markdown /tmp/campaign.md
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.submit_load import Load, Sample, verify  # noqa: E402
from tests.models import make_llama_pair  # noqa: E402
from tests.service.conftest import API_KEYS, FAST_ENV, HF_WEBHOOK_SECRET  # noqa: E402
from tests.service.test_worker_jobs import (  # noqa: E402
    Jobs,
    assert_same_output,
    big_spec,
    write_big_pair,
)
from tests.service.test_worker_recovery import Workers, wait_for  # noqa: E402
from tests.service.test_worker_webhooks import Receiver, tiny_spec  # noqa: E402
from worker.engine.pipeline import REPORT_FILE  # noqa: E402
from worker.io.staging import STAGING_MARK  # noqa: E402
from worker.localstack import (  # noqa: E402
    LocalStack,
    _spawn,
    free_port,
    local_s3_client,
    wait_for_port,
)
from worker.webhooks import webhook_id_for  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")
PAUSE_POINTS = ("taken", "noted", "started", "finished")


# -- the stack: redis-server as compose runs it ---------------------------------------------------


def compose_redis_args() -> list[str]:
    """The redis-server flags of docker-compose.yml (AOF, fsync every second, noeviction)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["redis"]["command"]
    assert command[0] == "redis-server", command
    return [str(arg) for arg in command[1:]]


class CampaignStack(LocalStack):
    """A LocalStack whose redis-server runs with the compose file's persistence settings, so a
    restart replays the AOF as a deployment's would."""

    def start_redis(self):
        self.redis_port = self.redis_port or free_port()
        data = self.workdir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        argv = [shutil.which("redis-server") or "redis-server", "--port", str(self.redis_port)]
        argv += ["--bind", "127.0.0.1", "--dir", str(data), *compose_redis_args()]
        process = _spawn("redis", argv, os.environ, self.workdir)
        wait_for_port(self.redis_port, 15, process.popen)
        self.processes.insert(0, process)  # stopped last: the workers drain against it
        return process

    def restart_redis(self, sig: int) -> float:
        """Signal redis-server and wait for it to exit (start_redis() brings it back on the same
        port and data); returns the monotonic instant it was signalled."""
        (process,) = [p for p in self.processes if p.name == "redis"]
        down_at = time.monotonic()
        process.kill(sig)
        process.popen.wait(30)
        self.processes.remove(process)
        return down_at


def stack_env(root: Path, **extra: str) -> dict[str, str]:
    return {**FAST_ENV, "FAPM_LOCAL_ROOTS": str(root), **extra}


# -- small tools ----------------------------------------------------------------------------------


class PollingWatcher(threading.Thread):
    """Polls an output path until stopped, counting polls: a directory there must always be a
    complete model (it appears by one rename, report included)."""

    def __init__(self, output: Path) -> None:
        super().__init__(daemon=True)
        self.output = output
        self.polls = 0
        self.partial: list[list[str]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                names = sorted(p.name for p in self.output.iterdir())
            except FileNotFoundError:
                names = None
            self.polls += 1
            if names is not None and not (REPORT_FILE in names and "model.safetensors" in names):
                self.partial.append(names)
            time.sleep(0.001)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def shown(spread: dict | None) -> str:
    """min/median/max as one short string for the table."""
    return "-" if spread is None else "{min}/{median}/{max}".format(**spread)


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }


def parametrized(test: Callable) -> list:
    """The cases of a test's @pytest.mark.parametrize: the suite's probe lists, used as is."""
    (mark,) = [m for m in test.pytestmark if m.name == "parametrize"]
    return list(mark.args[1])


def same_as_cli(out: Path, reference: Path) -> bool:
    try:
        assert_same_output(out, reference)
    except (AssertionError, FileNotFoundError):
        return False
    return True


def cli_reference(spec: dict, out: Path) -> Path:
    """The job run by `fapm prune` with the same inputs (a subprocess, as a user runs it)."""
    if not (out / REPORT_FILE).exists():
        fapm = Path(sys.executable).parent / "fapm"
        argv = [str(fapm), "--debug", "prune", "--base", spec["base"]]
        argv += ["--finetuned", spec["finetuned"], "--out", str(out)]
        argv += ["--kernel", spec.get("kernel", "auto")]
        if "shard_size" in spec:
            argv += ["--shard-size", str(spec["shard_size"])]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"fapm prune exited {run.returncode}: {run.stderr[-2000:]}")
    return out


def holder_of(workers: Workers, needle: str):
    """The live worker one of whose processes has a file under `needle` open or mapped."""
    for worker in workers.live:
        try:
            processes = psutil.Process(worker.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for process in processes:
            try:
                paths = [f.path for f in process.open_files()]
                paths += [m.path for m in process.memory_maps(grouped=True)]
            except psutil.Error:
                continue
            if any(needle in path for path in paths):
                return worker
    return None


# -- 1. worker SIGKILL mid-job --------------------------------------------------------------------


def kill_midjob(workers: Workers, root: Path, kills: int, rng: random.Random) -> dict:
    jobs = Jobs(workers.stack)
    pair = write_big_pair(root / "big_pair")
    reference = cli_reference(big_spec(pair, root / "cli-reference"), root / "cli-reference")
    result = {"kills": 0, "missed_instant": 0, "succeeded": 0, "byte_identical": 0}
    result |= {"output_polls": 0, "partial_output_seen": 0, "attempts": [], "failures": []}
    recoveries: list[float] = []
    for i in range(kills):
        workers.keep(2)
        out = root / "midjob" / f"kill{i}"
        watcher = PollingWatcher(out)
        watcher.start()
        try:
            job_id = jobs.submit(big_spec(pair, out))
            target = rng.uniform(0.1, 0.8)
            jobs.wait(
                job_id,
                lambda r, t=target: (
                    r.status in TERMINAL
                    or (r.progress.stage == "prune" and r.progress.fraction >= t)
                ),
                timeout=180,
                every=0.01,
            )
            holder = holder_of(workers, str(pair[0].parent))
            if holder is None or jobs.get(job_id).status != "running":
                result["missed_instant"] += 1
                jobs.wait(job_id, timeout=180)
                continue
            holder.kill(signal.SIGKILL)
            holder.popen.wait(10)
            killed_at = time.time()
            at_kill = jobs.get(job_id)
            result["kills"] += 1
            record = jobs.wait(job_id, timeout=180)
        finally:
            watcher.stop()
        result["output_polls"] += watcher.polls
        result["partial_output_seen"] += len(watcher.partial)
        result["attempts"].append(record.attempts)
        if record.status == "succeeded":
            result["succeeded"] += 1
            recoveries.append(record.finished_at.timestamp() - killed_at)
        else:
            result["failures"].append(f"{job_id}: {record.status} {record.error}")
        if same_as_cli(out, reference):
            result["byte_identical"] += 1
        else:
            result["failures"].append(f"{job_id}: output differs from the CLI's")
        if at_kill.progress.fraction >= 1.0:
            result["failures"].append(f"{job_id}: killed after the prune ended")
        if STAGING_MARK in " ".join(p.name for p in out.parent.iterdir()):
            result["failures"].append(f"{job_id}: staging left next to {out}")
    result["recovery_seconds"] = spread(recoveries)
    result["held"] = (
        result["kills"] > 0
        and result["succeeded"] == result["byte_identical"] == result["kills"]
        and result["partial_output_seen"] == 0
        and not result["failures"]
    )
    return result


# -- 1b. worker killed at each instant the recovery work covers -------------------------------


def kill_instants(workers: Workers, root: Path, rounds: int, lease: float) -> dict:
    jobs = Jobs(workers.stack)
    pair = make_llama_pair(root / "pair", dtype=torch.bfloat16, seed=11)
    bound = 2 * lease + float(FAST_ENV["FAPM_HEARTBEAT_SECONDS"]) + 8
    result: dict = {"kills": 0, "succeeded": 0, "webhook_delivered": 0, "within_bound": 0}
    result |= {"bound_seconds": bound, "failures": [], "by_instant": {}}
    receiver = Receiver()
    try:
        for n in range(rounds):
            for point in PAUSE_POINTS:
                for target in ("pool_process", "whole_worker"):
                    workers.keep(2)
                    receiver.deliveries.clear()
                    out = root / "instants" / f"{point}-{target}-{n}"
                    job_id = jobs.submit(
                        tiny_spec(pair, out), webhook={"url": receiver.url()}, enqueue=False
                    )
                    (workers.pause_dir / f"{job_id}.pause").write_text(point)
                    jobs.enqueue(job_id)
                    pool_pid = int(wait_for(workers.pause_dir / f"{point}-{job_id}", 120))
                    holder = workers.holding(pool_pid)
                    if target == "pool_process":
                        os.kill(pool_pid, signal.SIGKILL)
                    else:
                        holder.kill(signal.SIGKILL)
                        holder.popen.wait(10)
                    killed_at = time.time()
                    result["kills"] += 1
                    record = jobs.wait(job_id, timeout=bound + 60)
                    # At "finished" the outcome was recorded before the kill: 0, not negative.
                    job_s = max(0.0, record.finished_at.timestamp() - killed_at)
                    try:
                        delivered = receiver.wait_for(1, timeout=bound + 60)
                        hook_s = delivered[0].at - killed_at
                        ids = {d.headers["webhook-id"] for d in delivered}
                        hook_ok = ids == {webhook_id_for(job_id)}
                    except AssertionError:
                        hook_s, hook_ok = None, False
                    key = f"{point}/{target}"
                    result["by_instant"].setdefault(key, []).append(
                        {"job_s": round(job_s, 1), "webhook_s": hook_s and round(hook_s, 1)}
                    )
                    ok_job = record.status == "succeeded" and (out / REPORT_FILE).exists()
                    result["succeeded"] += ok_job
                    result["webhook_delivered"] += hook_ok
                    within = hook_s is not None and max(job_s, hook_s) < bound
                    result["within_bound"] += within
                    if not (ok_job and hook_ok and within):
                        result["failures"].append(
                            f"{key} {job_id}: {record.status} job {job_s:.1f}s webhook {hook_s}"
                        )
    finally:
        receiver.close()
    times = [e["job_s"] for v in result["by_instant"].values() for e in v]
    hooks = [e["webhook_s"] for v in result["by_instant"].values() for e in v if e["webhook_s"]]
    result["recovery_seconds"] = spread(times)
    result["webhook_seconds"] = spread(hooks)
    result["held"] = result["kills"] > 0 and not result["failures"]
    return result


# -- 2. Redis SIGTERM / SIGKILL with jobs queued and running -----------------------------------


def redis_restarts(workers: Workers, root: Path, rounds: int, queued: int) -> dict:
    stack = workers.stack
    jobs = Jobs(stack)
    pair = write_big_pair(root / "big_pair")
    small = make_llama_pair(root / "pair", dtype=torch.bfloat16, seed=11)
    result: dict = {"restarts": 0, "jobs": 0, "jobs_ended": 0, "jobs_succeeded": 0, "lost": 0}
    result |= {"api_while_down": {}, "failures": [], "seconds_to_all_ended": []}
    for n in range(rounds):
        sig = signal.SIGTERM if n % 2 == 0 else signal.SIGKILL
        workers.keep(2)
        running = jobs.submit(big_spec(pair, root / "redis" / f"r{n}-running"))
        waiting = [
            jobs.submit(tiny_spec(small, root / "redis" / f"r{n}-queued{i}")) for i in range(queued)
        ]
        jobs.wait(running, lambda r: r.status == "running" and r.progress.fraction > 0.05, 180)
        time.sleep(1.5)  # past one AOF fsync (everysec): what the compose file promises to keep
        down_at = stack.restart_redis(sig)
        with httpx.Client(base_url=stack.api_url, headers=jobs.api.headers, timeout=10) as http:
            for _ in range(3):
                answer = http.get("/v1/jobs")
                retry = "retry-after" in answer.headers
                try:
                    code = answer.json().get("code") if answer.status_code >= 400 else None
                except ValueError:
                    code = "not json"
                key = f"{answer.status_code} {code} retry-after={retry}"
                result["api_while_down"][key] = result["api_while_down"].get(key, 0) + 1
                time.sleep(0.3)
        stack.start_redis()
        result["restarts"] += 1
        ids = [running, *waiting]
        result["jobs"] += len(ids)
        deadline = time.monotonic() + 240
        ended: dict[str, str] = {}
        while len(ended) < len(ids) and time.monotonic() < deadline:
            for job_id in ids:
                if job_id in ended:
                    continue
                answer = jobs.api.get(f"/v1/jobs/{job_id}")
                if answer.status_code == 404:
                    ended[job_id] = "lost"
                elif answer.status_code == 200 and answer.json()["status"] in TERMINAL:
                    ended[job_id] = answer.json()["status"]
            time.sleep(0.2)
        result["seconds_to_all_ended"].append(round(time.monotonic() - down_at, 1))
        for job_id in ids:
            status = ended.get(job_id, "never ended")
            result["jobs_ended"] += status in TERMINAL
            result["jobs_succeeded"] += status == "succeeded"
            result["lost"] += status == "lost"
            if status != "succeeded":
                name = signal.Signals(sig).name
                result["failures"].append(f"{name} round {n}: {job_id} {status}")
    result["held"] = result["restarts"] > 0 and result["jobs_succeeded"] == result["jobs"]
    return result


# -- 2b. the webhooks worker SIGKILLed with deliveries in flight and retries scheduled ----------
# Deliveries run on their own `-Q webhooks` worker; the CPU worker (which also sweeps owed
# webhooks) stays up. Each round's jobs end while the webhooks worker holds one POST open per
# `hold_first` job and one retry countdown per `fail_first` job; then its whole process group is
# SIGKILLed, one more job ends while no webhooks worker lives, and a new one is started.
# Holds first: they wait for the kill; the retries (due HOOK_FIRST_RETRY later) come last.
HOOK_PLANS = ("hold_first", "hold_first", "ok", "fail_first", "fail_first")
HOOK_TIMEOUT = 12.0  # longer than a hold lasts: a held POST is still in flight at the kill
HOOK_FIRST_RETRY = 6.0  # +-25 %: the retry is still counting down when the last hold begins


class HookReceiver:
    """A webhook endpoint that answers each job by the plan in its URL (/hook/<plan>): `ok` 200;
    `fail_first` 500 to the first POST of a webhook-id, then 200; `hold_first` holds the first
    POST open until release(), then drops the connection unanswered (that POST dies with its
    worker), then 200. Per webhook-id it keeps every POST and the answer it got: a webhook
    delivered twice is two 200s for one id, counted, never merged."""

    def __init__(self) -> None:
        self.posts: dict[str, list[dict]] = {}
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                hook_id = self.headers.get("webhook-id", "?")
                plan = self.path.rsplit("/", 1)[-1]
                entry: dict = {"at": time.time(), "plan": plan, "answer": None}
                with receiver._lock:
                    earlier = receiver.posts.setdefault(hook_id, [])
                    first = not earlier
                    earlier.append(entry)
                    release = receiver._release
                if first and plan == "hold_first":
                    receiver.held.add(hook_id)
                    release.wait(120)
                    receiver.held.discard(hook_id)
                    entry["answer"] = "dropped"
                    self.close_connection = True
                    return
                code = 500 if first and plan == "fail_first" else 200
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()
                entry["answer"] = code  # only once the answer was written

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, plan: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook/{plan}"

    def release(self) -> None:
        """Drop every held POST unanswered; later first POSTs of hold_first jobs hold again."""
        with self._lock:
            self._release.set()
            self._release = threading.Event()

    def delivered_at(self, hook_id: str) -> list[float]:
        """When each 200 this webhook-id got was answered."""
        with self._lock:
            return [p["at"] for p in self.posts.get(hook_id, []) if p["answer"] == 200]

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def hook_state(receiver: HookReceiver, record, now: float) -> str:
    """Where a job's webhook stood when its worker was killed."""
    hook_id = webhook_id_for(record.id)
    attempts = record.webhook.deliveries if record.webhook else []
    if receiver.delivered_at(hook_id):
        return "delivered"
    if hook_id in receiver.held:
        return "in_flight"
    if attempts and attempts[-1].next_attempt_at and attempts[-1].next_attempt_at.timestamp() > now:
        return "retry_scheduled"
    return "not_yet_posted"


def kill_webhooks(stack: CampaignStack, root: Path, rounds: int, lease: float) -> dict:
    jobs = Jobs(stack)
    pair = make_llama_pair(root / "pair", dtype=torch.bfloat16, seed=11)
    heartbeat = float(FAST_ENV["FAPM_HEARTBEAT_SECONDS"])
    # A retry due just before the kill, then a POST that times out, then a lease to go stale.
    bound = HOOK_FIRST_RETRY * 1.25 + HOOK_TIMEOUT + 2 * lease + heartbeat + 8
    result: dict = {"kills": 0, "jobs": 0, "delivered_once": 0, "duplicated": 0, "lost": 0}
    result |= {"owed_after": 0, "posts": 0, "at_kill": {}, "bound_seconds": bound}
    result |= {"failures": [], "rounds": []}
    from_kill: list[float] = []
    from_restart: list[float] = []
    receiver = HookReceiver()
    hook_args = ["-Q", "webhooks", "--concurrency", str(1 + HOOK_PLANS.count("hold_first"))]
    hooks = stack.start_worker("hooks0", extra_args=hook_args)
    owed_by_round: list[dict[str, str]] = []
    try:
        for n in range(rounds):
            plans: dict[str, str] = {}
            for i, plan in enumerate(HOOK_PLANS):
                out = root / "hooks" / f"r{n}-{i}-{plan}"
                plans[jobs.submit(tiny_spec(pair, out), webhook={"url": receiver.url(plan)})] = plan

            want = {"hold_first": "in_flight", "fail_first": "retry_scheduled"}

            def ready(plans=plans, want=want) -> bool:
                now = time.time()
                records = {job_id: jobs.store.get(job_id) for job_id in plans}
                return all(r.status in TERMINAL for r in records.values()) and all(
                    hook_state(receiver, records[job_id], now) == want[plan]
                    for job_id, plan in plans.items()
                    if plan in want
                )

            deadline = time.monotonic() + 90
            while not ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            hooks.kill(signal.SIGKILL)
            hooks.popen.wait(10)
            killed_at = time.time()
            result["kills"] += 1
            at_kill: dict[str, int] = {}
            for job_id in plans:
                state = hook_state(receiver, jobs.store.get(job_id), killed_at)
                at_kill[state] = at_kill.get(state, 0) + 1
            receiver.release()  # the held POSTs' client is dead: drop them unanswered
            # One more job ends while no webhooks worker lives: its delivery waits in the queue.
            late = jobs.submit(
                tiny_spec(pair, root / "hooks" / f"r{n}-while-down"),
                webhook={"url": receiver.url("ok")},
            )
            plans[late] = "ok_while_down"
            at_kill["ended_while_down"] = 1
            jobs.wait(late, timeout=120)
            hooks = stack.start_worker(f"hooks{n + 1}", extra_args=hook_args)
            restarted_at = time.time()
            for state, count in at_kill.items():
                result["at_kill"][state] = result["at_kill"].get(state, 0) + count
            result["rounds"].append(
                {"at_kill": at_kill, "restart_s": round(restarted_at - killed_at, 1)}
            )
            deadline = time.monotonic() + bound + 30
            waiting = dict(plans)
            while waiting and time.monotonic() < deadline:
                for job_id in list(waiting):
                    first = receiver.delivered_at(webhook_id_for(job_id))
                    if first:
                        waiting.pop(job_id)
                        if first[0] > killed_at:
                            from_kill.append(first[0] - killed_at)
                            from_restart.append(max(0.0, first[0] - restarted_at))
                time.sleep(0.05)
            owed_by_round.append(plans)
        # Quiet time for a second delivery chain to show itself: the sweeper re-queues what is
        # still owed a lease after its stamp, and Celery restores an unacknowledged message after
        # the visibility timeout.
        time.sleep(HOOK_TIMEOUT + 2 * lease + heartbeat)
        for plans in owed_by_round:
            for job_id, plan in plans.items():
                hook_id = webhook_id_for(job_id)
                result["jobs"] += 1
                delivered = receiver.delivered_at(hook_id)
                result["posts"] += len(receiver.posts.get(hook_id, []))
                owed = jobs.store.redis.zscore("fapm:webhooks-owed", job_id) is not None
                record = jobs.store.get(job_id)
                attempts = record.webhook.deliveries if record.webhook else []
                recorded = bool(attempts) and attempts[-1].delivered
                result["delivered_once"] += len(delivered) == 1
                result["duplicated"] += len(delivered) > 1
                result["lost"] += not delivered
                result["owed_after"] += owed
                if len(delivered) != 1 or owed or not recorded or record.status != "succeeded":
                    answers = [p["answer"] for p in receiver.posts.get(hook_id, [])]
                    result["failures"].append(
                        f"{plan} {job_id}: {record.status}, answers {answers}, owed {owed}, "
                        f"recorded attempts {[(a.attempt, a.delivered) for a in attempts]}"
                    )
        strangers = set(receiver.posts) - {
            webhook_id_for(job_id) for plans in owed_by_round for job_id in plans
        }
        if strangers:
            result["failures"].append(f"POSTs with unknown webhook-ids: {sorted(strangers)}")
    finally:
        receiver.close()
    result["seconds_from_kill"] = spread(from_kill)
    result["seconds_from_restart"] = spread(from_restart)
    result["held"] = result["kills"] > 0 and not result["failures"]
    return result


# -- 2c. a worker SIGKILLed mid-upload to S3 (moto_server) ---------------------------------------
# Where a kill lands: while shards stream to the staging prefix (a local or an s3:// source),
# while a shard over the multipart threshold uploads to staging, while the promote copies objects
# to the output (before the manifest, the commit point), and while a large object is copied
# there part by part.
S3_KILL_POINTS = (
    ("stream", "local"),
    ("stream", "s3"),
    ("promote", "s3"),
    ("multipart_staging", "local"),
    ("multipart_promote", "local"),
)
S3_BUCKET = "models"
S3_SHARD = "600KB"  # the 32-tensor pair in 32 shards, uploaded as they complete
# One shard over S3Target's multipart threshold (64 MiB): uploaded, then copied, in parts.
LARGE_TENSORS, LARGE_ROWS, LARGE_COLS = 10, 2048, 4096


def campaign_s3(stack: CampaignStack):
    return local_s3_client(stack.s3_url)


def s3_listing(client, prefix: str) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def open_uploads(client) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=S3_BUCKET).get("Uploads", [])]


def write_large_pair(directory: Path) -> tuple[Path, Path]:
    """A pair whose pruned output, one shard, is over the multipart threshold."""
    base_dir, ft_dir = directory / "base", directory / "finetuned"
    if (ft_dir / "model.safetensors").exists():
        return base_dir, ft_dir
    generator = torch.Generator().manual_seed(3)
    base = {
        f"model.layers.{i}.mlp.weight": torch.randn(LARGE_ROWS, LARGE_COLS, generator=generator).to(
            torch.bfloat16
        )
        for i in range(LARGE_TENSORS)
    }
    for path, scale in ((base_dir, 0.0), (ft_dir, 0.01)):
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: (w.float() + scale * torch.randn(w.shape, generator=generator)).to(torch.bfloat16)
            for name, w in base.items()
        }
        save_file(tensors, path / "model.safetensors")
    return base_dir, ft_dir


class PrefixWatcher(threading.Thread):
    """Polls an S3 output prefix until stopped. The manifest is the commit point: whenever it is
    listed, every file it names must be listed with its size ("broken" otherwise). Polls that
    list objects but no manifest are the promote's copies before the commit, counted; the
    first one sets `uncommitted`."""

    def __init__(self, client, prefix: str) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.prefix = prefix
        self.polls = 0
        self.uncommitted_polls = 0
        self.broken: list[str] = []
        self.uncommitted = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        from worker.io.publish import MANIFEST_FILE

        manifest_files: list | None = None
        while not self._halt.is_set():
            try:
                listing = s3_listing(self.client, self.prefix)
                names = {key[len(self.prefix) :]: size for key, size in listing.items()}
                if MANIFEST_FILE in names and manifest_files is None:
                    raw = self.client.get_object(Bucket=S3_BUCKET, Key=self.prefix + MANIFEST_FILE)
                    manifest_files = json.loads(raw["Body"].read())["files"]
            except Exception as exc:  # moto busy: this poll saw nothing
                self.broken.append(f"poll error {type(exc).__name__}: {exc}"[:200])
                continue
            self.polls += 1
            if MANIFEST_FILE in names:
                missing = [f["name"] for f in manifest_files if names.get(f["name"]) != f["size"]]
                if missing:
                    self.broken.append(f"manifest listed, missing or resized: {missing[:3]}")
            elif names:
                self.uncommitted_polls += 1
                self.uncommitted.set()
            time.sleep(0.005)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def wait_until(check: Callable[[], bool], timeout: float, every: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return False


def kill_s3(workers: Workers, root: Path, kills: int, rng: random.Random, scratch: Path) -> dict:
    from worker.io.publish import MANIFEST_FILE

    stack = workers.stack
    jobs = Jobs(stack)
    client = campaign_s3(stack)
    client.create_bucket(Bucket=S3_BUCKET)
    small = write_big_pair(root / "big_pair")
    large = write_large_pair(root / "large_pair")
    for prefix, directory in (("big/base", small[0]), ("big/ft", small[1])):
        client.upload_file(
            str(directory / "model.safetensors"), S3_BUCKET, f"{prefix}/model.safetensors"
        )
    sources = {
        "local": (str(small[0]), str(small[1])),
        "s3": ("s3://models/big/base/", "s3://models/big/ft/"),
    }
    references = {
        "small": cli_reference(
            big_spec(small, root / "s3-ref-small", shard_size=S3_SHARD), root / "s3-ref-small"
        ),
        "large": cli_reference(
            big_spec(large, root / "s3-ref-large", shard_size="1GB"), root / "s3-ref-large"
        ),
    }
    result: dict = {"kills": 0, "missed_instant": 0, "succeeded": 0, "byte_identical": 0}
    result |= {"staging_left": 0, "uploads_left": 0, "scratch_left": 0, "by_point": {}}
    result |= {"output_polls": 0, "uncommitted_polls": 0, "broken_manifest_polls": 0}
    result |= {"failures": [], "attempts": []}
    recoveries: list[float] = []
    for i in range(kills):
        point, source = S3_KILL_POINTS[i % len(S3_KILL_POINTS)]
        workers.keep(2)
        prefix = f"out/kill{i}-{point}/"
        large_job = point.startswith("multipart")
        base, finetuned = (str(large[0]), str(large[1])) if large_job else sources[source]
        spec = {
            "base": base,
            "finetuned": finetuned,
            "output": f"s3://{S3_BUCKET}/{prefix}",
            "shard_size": "1GB" if large_job else S3_SHARD,
            "kernel": "torch",
        }
        reference = references["large" if large_job else "small"]
        watcher = PrefixWatcher(campaign_s3(stack), prefix)
        watcher.start()
        tally = result["by_point"].setdefault(f"{point}/{source}", {"kills": 0, "held": 0})
        try:
            job_id = jobs.submit(spec)
            jobs.wait(job_id, lambda r: r.status != "queued", timeout=120, every=0.01)
            holder = None
            deadline = time.monotonic() + 30
            while holder is None and time.monotonic() < deadline:
                holder = holder_of(workers, str(scratch))  # the process with the job's scratch
                time.sleep(0.02)
            if point == "stream":
                target = rng.randint(4, 24)
                jobs.wait(
                    job_id,
                    lambda r, t=target: r.status in TERMINAL or r.progress.tensors_done >= t,
                    timeout=180,
                    every=0.01,
                )
                hit = jobs.get(job_id).status == "running"
            elif point == "promote":
                hit = wait_until(watcher.uncommitted.is_set, 180)
            else:
                wanted = prefix if point == "multipart_promote" else "fapm-staging"
                hit = wait_until(
                    lambda w=wanted, mark=f".kill{i}-": any(
                        k.startswith(w) or (w in k and mark in k) for k in open_uploads(client)
                    ),
                    180,
                    0.01,
                )
            if not hit or holder is None or not holder.alive():
                result["missed_instant"] += 1
                record = jobs.wait(job_id, timeout=240)
            else:
                holder.kill(signal.SIGKILL)
                holder.popen.wait(10)
                killed_at = time.time()
                result["kills"] += 1
                tally["kills"] += 1
                left = s3_listing(client, prefix)
                tally.setdefault("objects_at_output_after_kill", []).append(len(left))
                record = jobs.wait(job_id, timeout=240)
                if record.status == "succeeded":
                    recoveries.append(record.finished_at.timestamp() - killed_at)
        finally:
            watcher.stop()
        failures: list[str] = []
        result["attempts"].append(record.attempts)
        result["output_polls"] += watcher.polls
        result["uncommitted_polls"] += watcher.uncommitted_polls
        result["broken_manifest_polls"] += len(watcher.broken)
        failures += [f"output poll: {b}" for b in watcher.broken[:3]]
        objects = {
            key[len(prefix) :]: client.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read()
            for key in s3_listing(client, prefix)
        }
        if record.status == "succeeded":
            result["succeeded"] += 1
        else:
            error = record.error and f"{record.error.code}: {record.error.message[:200]}"
            failures.append(f"ended {record.status} ({error}); at the output: {sorted(objects)}")
        expected = {p.name for p in reference.iterdir()} | {MANIFEST_FILE}
        weights = [n for n in expected if n.endswith((".safetensors", ".index.json"))]
        same = set(objects) == expected and all(
            objects[n] == (reference / n).read_bytes() for n in weights
        )
        if same:
            manifest = json.loads(objects[MANIFEST_FILE])
            listed = {f["name"]: (f["size"], f["sha256"]) for f in manifest["files"]}
            actual = {
                n: (len(b), hashlib.sha256(b).hexdigest())
                for n, b in objects.items()
                if n != MANIFEST_FILE
            }
            same = manifest.get("job_id") == job_id and listed == actual
        if same:
            result["byte_identical"] += 1
        elif record.status == "succeeded":
            failures.append("output differs from `fapm prune`'s or from its manifest")
        staging = [k for k in s3_listing(client, "out/") if "fapm-staging" in k]
        uploads = open_uploads(client)
        result["staging_left"] += len(staging)
        result["uploads_left"] += len(uploads)
        if staging:
            failures.append(f"{len(staging)} staging objects left, e.g. {staging[0]}")
        if uploads:
            failures.append(f"open multipart uploads left: {uploads[:3]}")
            for upload in client.list_multipart_uploads(Bucket=S3_BUCKET).get("Uploads", []):
                client.abort_multipart_upload(  # not counted again for the next job
                    Bucket=S3_BUCKET, Key=upload["Key"], UploadId=upload["UploadId"]
                )
        if staging:  # the same: each job's leftovers are counted once
            client.delete_objects(
                Bucket=S3_BUCKET, Delete={"Objects": [{"Key": k} for k in staging[:1000]]}
            )
        tally["held"] += not failures
        result["failures"] += [f"{point}/{source} {job_id}: {f}" for f in failures]
        if large_job:  # moto holds objects in memory: free the large ones once checked
            keys = list(s3_listing(client, prefix))
            if keys:
                client.delete_objects(
                    Bucket=S3_BUCKET, Delete={"Objects": [{"Key": k} for k in keys]}
                )
    # Each new pool process sweeps the scratch a killed one left (worker/io/scratch.py).
    workers.keep(2)
    scratch_left = [p.name for p in scratch.glob("fapm-*")]
    result["scratch_left"] = len(scratch_left)
    if scratch_left:
        result["failures"].append(f"local scratch left after the kills: {scratch_left[:5]}")
    result["recovery_seconds"] = spread(recoveries)
    result["held"] = result["kills"] > 0 and not result["failures"]
    return result


# -- 3. concurrent submissions, idempotency keys, quota ----------------------------------------


async def _at_once(load: Load, phase: str, indexes: list[int]) -> list[Sample]:
    samples = [Sample(due=time.perf_counter()) for _ in indexes]
    await asyncio.gather(*(load.submit(phase, i, s) for i, s in zip(indexes, samples, strict=True)))
    return samples


def job_hash_count(client: redis.Redis) -> int:
    return sum(
        1
        for key in client.scan_iter(match="fapm:job:*", count=5000)
        if ":" not in key.decode().removeprefix("fapm:job:")
    )


async def _submissions(stack: CampaignStack, keys: dict, root: Path, args) -> dict:
    result: dict = {}
    burst_keys = {t: k for t, k in keys.items() if t.startswith("load")}
    load = Load(stack.api_url, burst_keys, root, args.burst, "raw")
    async with load.client:
        samples = await _at_once(load, "burst", list(range(args.burst)))
        statuses: dict[int, int] = {}
        for s in samples:
            statuses[s.status] = statuses.get(s.status, 0) + 1
        audit = verify(stack.redis_url, samples)
        result["burst"] = {"sent": args.burst, "statuses": statuses, "audit": audit}
        result["burst"]["held"] = statuses == {202: args.burst} and audit["exactly_once"]

        client = redis.Redis.from_url(stack.redis_url)
        before = job_hash_count(client)
        load.idempotency = True
        rng = random.Random(args.seed)
        copies = {i: rng.randint(2, 5) for i in range(args.idempotency_keys)}
        indexes = [i for i, n in copies.items() for _ in range(n)]
        rng.shuffle(indexes)
        answered = await _at_once(load, "idem", indexes)
        # A duplicate that arrives while the first request is still being stored gets the
        # documented 409 idempotency_key_in_flight (Retry-After: 1); the client retries it.
        in_flight = [
            (i, s)
            for i, s in zip(indexes, answered, strict=True)
            if "in-flight" in s.error or "in_flight" in s.error
        ]
        await asyncio.sleep(1.0)
        retried = await _at_once(load, "idem", [i for i, _ in in_flight])
        by_key: dict[int, set] = {}
        statuses: dict[int, int] = {}
        for i, sample in [
            *zip(indexes, answered, strict=True),
            *zip([i for i, _ in in_flight], retried, strict=True),
        ]:
            statuses[sample.status] = statuses.get(sample.status, 0) + 1
            if sample.status == 202:
                by_key.setdefault(i, set()).add(sample.job_id)
        other = sum(n for status, n in statuses.items() if status != 202) - len(in_flight)
        created = job_hash_count(client) - before
        client.close()
        one_each = sum(1 for ids in by_key.values() if len(ids) == 1)
        result["idempotency"] = {
            "keys": len(copies),
            "requests": len(indexes),
            "statuses": statuses,
            "in_flight_409_then_retried": len(in_flight),
            "keys_with_one_job": one_each,
            "jobs_created": created,
            "held": one_each == len(copies) == created and other == 0,
        }
        if load.raw is not None:
            await load.raw.aclose()

    # The quota: a second API process on the same Redis with the limit set.
    main_port, stack.api_port = stack.api_port, 0
    stack.start_api({"FAPM_MAX_ACTIVE_JOBS_PER_TENANT": str(args.quota_limit)})
    quota_url, stack.api_port = stack.api_url, main_port
    quota = Load(quota_url, {"quota": keys["quota"]}, root, args.quota_burst, "raw")
    async with quota.client:
        samples = await _at_once(quota, "quota", list(range(args.quota_burst)))
        if quota.raw is not None:
            await quota.raw.aclose()
    statuses = {}
    for s in samples:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    result["quota"] = {
        "limit": args.quota_limit,
        "sent": args.quota_burst,
        "statuses": statuses,
        "held": statuses == {202: args.quota_limit, 429: args.quota_burst - args.quota_limit},
    }
    result["held"] = all(part["held"] for part in result.values())
    return result


# -- 4. security probes -----------------------------------------------------------------------


class Tally:
    """Probes counted by what they expect: `refused` ones must be refused, `accepted` ones
    (controls: the guard must not refuse everything) must be accepted."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def count(self, probe: str, held: bool, detail: str = "") -> None:
        row = self.rows.setdefault(probe, {"tried": 0, "held": 0, "failures": []})
        row["tried"] += 1
        row["held"] += bool(held)
        if not held and len(row["failures"]) < 10:
            row["failures"].append(detail[:300])


def _is_problem(response: httpx.Response, status: int, code: str | None = None) -> bool:
    if response.status_code != status:
        return False
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return False
    return code is None or response.json().get("code") == code


def api_probes(stack: CampaignStack, root: Path, tally: Tally) -> None:
    """Probes of the API alone (no worker, no webhook allow-list)."""
    from tests.service.test_api_limits import TOO_MANY, raw_request
    from tests.service.test_api_unicode import JOB_CASES, _with_lone_surrogate
    from tests.service.test_input_guards import (
        test_exclude_re2_cannot_run_is_422_naming_exclude as exclude_cases,
    )
    from tests.service.test_input_guards import (
        test_webhook_to_a_non_global_address_is_422 as guard_urls,
    )
    from tests.unit import test_netguard, test_uri_names

    body = {
        "base": str(root / "base"),
        "finetuned": str(root / "finetuned"),
        "output": str(root / "out" / "probe"),
    }
    http = httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {API_KEYS['alice']}"}
    )
    with http:
        refused_urls = [url for url, _ in parametrized(test_netguard.test_refused_webhook_urls)]
        addresses = parametrized(test_netguard.test_non_global_and_embedded_addresses_are_refused)
        refused_urls += [f"https://{address}/hook" for address, _ in addresses]
        refused_urls += parametrized(guard_urls)
        refused_urls += ["https://metadata/computeMetadata/v1/", "https://instance-data/latest/"]
        for url in dict.fromkeys(refused_urls):
            answer = http.post("/v1/jobs", json={**body, "webhook": {"url": url}})
            tally.count("SSRF: webhook URL refused (422)", answer.status_code == 422, url)
        for address in parametrized(test_netguard.test_globally_routable_addresses_are_allowed):
            answer = http.post(
                "/v1/jobs", json={**body, "webhook": {"url": f"https://{address}/h"}}
            )
            tally.count("SSRF control: public address accepted", answer.status_code == 202, address)
            if answer.status_code == 202:
                http.post(f"/v1/jobs/{answer.json()['id']}/cancel")

        names = [f"s3://{bucket}/prefix/" for bucket, _ in test_uri_names.BAD_BUCKETS]
        keys = parametrized(test_uri_names.test_keys_that_escape_or_confuse_are_refused)
        names += [f"s3://models/{key}" for key, _ in keys]
        names += [f"hf://{repo}" for repo in test_uri_names.BAD_REPOS]
        names += [f"hf://org/name@{rev}" for rev in test_uri_names.BAD_REVISIONS]
        for name in names:
            for field in ("base", "output"):
                answer = http.post("/v1/jobs", json={**body, field: name})
                tally.count("s3/hf name attacks refused (422)", answer.status_code == 422, name)

        for pattern, _ in parametrized(exclude_cases):
            answer = http.post("/v1/jobs", json={**body, "exclude": pattern})
            tally.count("exclude RE2 cannot run: 422", answer.status_code == 422, pattern)

        for case, extra, _ in JOB_CASES:
            job = {**body, **extra}
            if case == "output uri":
                job["output"] = str(root / "out" / "MARK")
            answer = http.post(
                "/v1/jobs",
                content=_with_lone_surrogate(job, "MARK"),
                headers={"content-type": "application/json"},
            )
            held = _is_problem(answer, 422, "validation_error")
            tally.count("lone surrogate: 422, nothing stored", held, f"{case}: {answer.text}")
            listed = http.get("/v1/jobs")
            tally.count("tenant's list still readable after", listed.status_code == 200, case)

        for name, headers in (
            ("1 MB header", [("X-Huge", "h" * 1_000_000)]),
            ("5,000 headers", TOO_MANY),
        ):
            status, _ = raw_request(stack.api_port, headers)
            tally.count("huge request heads refused (400/431)", status in (400, 431), name)
            tally.count("served after a huge head", raw_request(stack.api_port, [])[0] == 200)

        hook = "/v1/hooks/huggingface"
        garbage = b'{"event": {"action": "\\ud800"'
        for headers in ({}, {"X-Webhook-Secret": "wrong"}):
            answer = http.post(hook, content=garbage, headers=headers)
            tally.count("Hub webhook: bad secret 401 before the body", answer.status_code == 401)
        tally.count(
            "Hub webhook: bad secret 401 before the body",
            _answers_before_body(stack.api_port, hook),
            "the API waited for the body",
        )


def _answers_before_body(port: int, path: str) -> bool:
    """A head announcing a body just under the body limit (1 MiB), with a wrong secret, and no
    body sent: the 401 comes back without the API waiting for the body."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Webhook-Secret: wrong\r\n"
    head += "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        try:
            answer = sock.recv(4096)
        except TimeoutError:
            return False
    return answer.startswith(b"HTTP/1.1 401")


def _tree(path: Path) -> dict[str, bytes]:
    files = (p for p in sorted(path.rglob("*")) if p.is_file() and not p.is_symlink())
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def _keys_holding(client: redis.Redis, needle: bytes) -> list[str]:
    """The Redis keys whose value (string, hash, list, set, zset or stream) contains `needle`."""
    found = []
    for key in client.scan_iter(count=5000):
        kind = client.type(key).decode()
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "hash":
            values = [b"%s=%s" % kv for kv in client.hgetall(key).items()]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [repr(entry).encode() for entry in client.xrange(key)]
        else:
            values = []
        if any(needle in value for value in values):
            found.append(key.decode())
    return found


def tenant_probes(stack: CampaignStack, places: dict, tally: Tally) -> dict:
    """Probes of the full stack (API + worker) with a tenant locations file."""
    from tests.service.test_webhook_redaction import PathReceiver

    alice = httpx.Client(
        base_url=stack.api_url, headers={"Authorization": "Bearer " + API_KEYS["alice"]}
    )
    bob = httpx.Client(
        base_url=stack.api_url, headers={"Authorization": "Bearer " + API_KEYS["bob"]}
    )
    pair = places["pair"]
    figures: dict = {}

    def spec(output, **extra) -> dict:
        return {"base": str(pair.base), "finetuned": str(pair.finetuned), "output": str(output)} | {
            "sparsity": 0.5,
            **extra,
        }

    def run(http: httpx.Client, body: dict, timeout: float = 180) -> dict:
        answer = http.post("/v1/jobs", json=body)
        if answer.status_code != 202:
            return {"status": f"http {answer.status_code}", "error": answer.text}
        job_id = answer.json()["id"]
        deadline = time.monotonic() + timeout
        while (record := http.get(f"/v1/jobs/{job_id}").json())["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return record

    with alice, bob:
        out = places["alice"] / "model-a"
        record = run(alice, spec(out))
        tally.count(
            "control: alice's own job succeeds", record["status"] == "succeeded", str(record)
        )
        job_id = record.get("id", "")
        for method, route in (
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}/report"),
            ("GET", f"/v1/jobs/{job_id}/events"),
            ("POST", f"/v1/jobs/{job_id}/cancel"),
        ):
            answer = bob.request(method, route)
            tally.count("cross-tenant job routes: 404", answer.status_code == 404, route)
        listed = bob.get("/v1/jobs", params={"limit": 200}).text
        tally.count("cross-tenant job routes: 404", job_id not in listed, "bob's list")

        published = _tree(out)
        attempts = [
            ("bob reads alice's output", bob, spec(places["bob"] / "b1") | {"finetuned": str(out)}),
            ("bob writes in alice's root", bob, spec(places["alice"] / "b2")),
            ("bob overwrites alice's model", bob, spec(out, overwrite=True)),
            ("alice writes a read-only root", alice, spec(places["bases"] / "a2")),
            ("alice publishes to a read-only Hub org", alice, spec("hf://acme/pruned")),
        ]
        for name, http, body in attempts:
            answer = http.post("/v1/jobs", json=body)
            tally.count(
                "cross-tenant locations: 422", _is_problem(answer, 422, "invalid_location"), name
            )
        tally.count("cross-tenant locations: 422", _tree(out) == published, "alice's model intact")

        (places["alice"] / "keep.txt").write_text("alice's data")
        before = _tree(places["alice"])
        for output in (places["alice"], places["top"], pair.base.parent, pair.finetuned):
            answer = alice.post("/v1/jobs", json=spec(output, overwrite=True))
            held = _is_problem(answer, 422, "invalid_location")
            tally.count("root/ancestor/input as output with overwrite: 422", held, str(output))
        tally.count(
            "root/ancestor/input as output with overwrite: 422",
            _tree(places["alice"]) == before,
            "alice's root intact",
        )
        data = places["alice"] / "data"
        data.mkdir(exist_ok=True)
        (data / "precious.txt").write_text("not a model")
        record = run(alice, spec(data, overwrite=True))
        held = (record.get("error") or {}).get("code") == "output_not_replaceable"
        tally.count("overwrite of a non-fapm directory refused", held, str(record))
        tally.count(
            "overwrite of a non-fapm directory refused",
            _tree(data) == {"precious.txt": b"not a model"},
            "data intact",
        )

        secret = b"SECRET-OUTSIDE-EVERY-ROOT"
        for file in ("model.safetensors", "tokenizer_config.json", "config.json"):
            target = places["outside"] / file
            if file == "model.safetensors":
                shutil.copy(pair.finetuned / file, target)
            else:
                target.write_bytes(b'{"secret": "' + secret + b'"}')
            model = places["alice"] / f"linked-{file}"
            shutil.copytree(pair.finetuned, model)
            (model / file).unlink()
            (model / file).symlink_to(target)
            link_out = places["alice"] / f"out-linked-{file}"
            record = run(alice, spec(link_out) | {"finetuned": str(model)})
            held = (record.get("error") or {}).get("code") == "invalid_location"
            held = held and not link_out.exists()
            tally.count("symlink escapes: job fails, nothing published", held, f"{file}: {record}")
        # Into the other tenant's root: inside a root, not one of bob's.
        borrowed = places["bob"] / "borrowed"
        shutil.copytree(pair.finetuned, borrowed)
        (borrowed / "model.safetensors").unlink()
        (borrowed / "model.safetensors").symlink_to(out / "model.safetensors")
        record = run(bob, spec(places["bob"] / "out-borrowed") | {"finetuned": str(borrowed)})
        held = (record.get("error") or {}).get("code") == "invalid_location"
        tally.count(
            "symlink escapes: job fails, nothing published", held, f"into alice's: {record}"
        )
        leaked = any(secret in b for b in _tree(places["alice"]).values())
        tally.count("symlink escapes: job fails, nothing published", not leaked, "secret copied")

        started = time.monotonic()
        record = run(alice, spec(places["alice"] / "re2", exclude="(.|.)*x$|norm", kernel="torch"))
        figures["catastrophic_exclude_job_seconds"] = round(time.monotonic() - started, 1)
        tally.count(
            "catastrophic regex (.|.)*x$ runs in linear time",
            record["status"] == "succeeded",
            str(record),
        )

        token = "tok-" + os.urandom(8).hex()
        receiver = PathReceiver()
        try:
            url = f"http://127.0.0.1:{receiver.port}/hook?token={token}&team=nlp"
            body = spec(places["alice"] / "redacted") | {
                "finetuned": str(places["alice"] / "no-such-model"),
                "webhook": {"url": url},
            }
            answers = [alice.post("/v1/jobs", json=body)]
            redacted_id = answers[0].json().get("id", "")
            deadline = time.monotonic() + 60
            while not receiver.seen and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # the worker logs the delivery after the receiver answered
            answers += [alice.get(f"/v1/jobs/{redacted_id}"), alice.get("/v1/jobs")]
            tally.count(
                "webhook token: delivered to the full URL",
                bool(receiver.seen) and token in receiver.seen[0][0],
                "not delivered",
            )
            for answer in answers:
                tally.count("webhook token: never shown", token not in answer.text, answer.url.path)
            if receiver.seen:
                tally.count(
                    "webhook token: never shown",
                    token.encode() not in receiver.seen[0][1],
                    "in the delivered body",
                )
            logs = sorted(stack.workdir.rglob("*.log"))
            for log in logs:
                tally.count(
                    "webhook token: never shown",
                    token.encode() not in log.read_bytes(),
                    str(log.name),
                )
            # Not a leak: the worker needs the full URL to deliver (as it needs the signing
            # secret), so Redis holds it at rest; reported, not counted.
            client = redis.Redis.from_url(stack.redis_url)
            holding = _keys_holding(client, token.encode())
            figures["token_at_rest_in_redis"] = [re.sub("[0-9a-f]{32}", "{id}", k) for k in holding]
            client.close()
            aof = [p for p in (stack.workdir / "redis").rglob("*") if p.is_file()]
            figures["token_in_redis_files"] = [
                p.name for p in aof if token.encode() in p.read_bytes()
            ]
            figures["log_files_searched_for_token"] = len(logs)
        finally:
            receiver.server.shutdown()
            receiver.server.server_close()
    return figures


def make_places(root: Path) -> dict:
    top = root
    places = {name: top / name for name in ("bases", "alice", "bob", "outside")}
    for path in places.values():
        path.mkdir(parents=True, exist_ok=True)
    places["top"] = top
    places["pair"] = make_llama_pair(places["bases"] / "pair", dtype=torch.bfloat16, seed=5)
    table = {
        "tenants": {
            "alice": {"read": [str(places["bases"]), "hf://acme"], "write": [str(places["alice"])]},
            "bob": {"read": [str(places["bases"]), "hf://acme"], "write": [str(places["bob"])]},
        }
    }
    places["file"] = places["outside"] / "tenants.yaml"
    places["file"].write_text(yaml.safe_dump(table))
    return places


# -- 5. fuzz and schemathesis --------------------------------------------------------------------


def fuzz(headers: int, docs: int) -> dict:
    """The fuzz test's generators, its seeds, counted (the test asserts; this reports)."""
    from tests.integration import test_fuzz_inputs as f
    from worker.errors import CorruptCheckpoint
    from worker.evaluation.data import parse_general, parse_task
    from worker.evaluation.errors import EmptyEvalSet, EvalDataError
    from worker.io.checkpoint import parse_config, parse_index
    from worker.io.safetensors_format import parse_header

    rng = random.Random(f.SEED)
    raw = f._checkpoint()
    n = int.from_bytes(raw[:8], "little")
    header_bytes, data = raw[8 : 8 + n], raw[8 + n :]
    header = json.loads(header_bytes)
    counts = {"parsed": 0, "corrupt_checkpoint": 0, "untyped": 0, "reference_disagrees": 0}
    examples = []
    started = time.perf_counter()
    for case in range(headers):
        if case % 3 == 2:
            body = f._mutate_bytes(rng, header_bytes)
        else:
            mutated = f._mutate_structure(rng, header)
            body = json.dumps(mutated, ensure_ascii=rng.random() < 0.5).encode("utf-8", "replace")
            if rng.random() < 0.3:
                body = f._mutate_bytes(rng, body)
        file_size = 8 + len(body) + len(data) + rng.choice([0, 0, 0, -1, 1, -len(data)])
        try:
            parsed = parse_header(body, file_size, "fuzz.safetensors")
        except CorruptCheckpoint:
            counts["corrupt_checkpoint"] += 1
            continue
        except Exception as exc:
            counts["untyped"] += 1
            examples.append(f"{type(exc).__name__}: {str(exc)[:120]}")
            continue
        counts["parsed"] += 1
        if file_size == 8 + len(body) + len(data):
            try:
                f._check_against_reference(body, data, parsed)
            except Exception as exc:
                counts["reference_disagrees"] += 1
                examples.append(f"reference: {type(exc).__name__}: {str(exc)[:120]}")
    header_seconds = time.perf_counter() - started

    rng = random.Random(f.SEED + 1)
    index = json.dumps(
        {"metadata": {"total_size": 96}, "weight_map": {"a": "m-1.safetensors", "b": "m-2"}}
    )
    config = json.dumps(
        {"model_type": "llama", "hidden_size": 8, "text_config": {"vocab_size": 32}}
    )
    task = b'{"prompt": "2+2=", "completion": " 4"}'
    general = b'{"text": "The sky is blue."}'
    parsers = {
        "index": (lambda d: parse_index(d, "index.json"), [index.encode()], (CorruptCheckpoint,)),
        "config": (
            lambda d: parse_config(d, "config.json"),
            [config.encode()],
            (CorruptCheckpoint,),
        ),
        "task_jsonl": (
            lambda d: parse_task("t.jsonl", task + b"\n" + d + b"\n"),
            [task],
            (EvalDataError, EmptyEvalSet),
        ),
        "general_jsonl": (
            lambda d: parse_general("g.jsonl", d + b"\r\n" + general),
            [general],
            (EvalDataError, EmptyEvalSet),
        ),
    }
    documents = {}
    for name, (parse, seeds, typed) in parsers.items():
        tally = {"cases": 0, "accepted": 0, "typed_error": 0, "untyped": 0}
        for doc in f._fuzz_documents(rng, seeds, docs):
            tally["cases"] += 1
            try:
                parse(doc)
                tally["accepted"] += 1
            except typed:
                tally["typed_error"] += 1
            except Exception as exc:
                tally["untyped"] += 1
                examples.append(f"{name}: {type(exc).__name__}: {str(exc)[:120]}")
        documents[name] = tally
    untyped = counts["untyped"] + sum(d["untyped"] for d in documents.values())
    return {
        "headers": {"cases": headers, **counts, "seconds": round(header_seconds, 1)},
        "documents": documents,
        "untyped_examples": examples[:10],
        "held": untyped == 0 and counts["reference_disagrees"] == 0,
    }


def schemathesis() -> dict:
    """The suite's schemathesis test (real API, all checks, fixed seed), its printed counts."""
    test = "tests/service/test_openapi_schemathesis.py::test_schemathesis_all_checks_find_nothing"
    argv = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", test]
    started = time.monotonic()
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    line = re.search(r"(\d+) generated(, [^\n]*)?", output)
    counts = {"generated": int(line.group(1))} if line else {}
    for number, word in re.findall(
        r"(\d+) (passed|failed|errored|skipped)", line.group(0) if line else ""
    ):
        counts[word] = int(number)
    return {
        "test_exit": run.returncode,
        "line": line.group(0) if line else output[-500:],
        **counts,
        "seconds": round(time.monotonic() - started),
        "held": run.returncode == 0 and counts.get("failed", 0) == 0 and bool(counts),
    }


# -- the campaign -----------------------------------------------------------------------------


def section(summary: dict, name: str, work: Callable[[], dict]) -> None:
    started = time.monotonic()
    print(f"[campaign] {name} ...", file=sys.stderr, flush=True)
    try:
        summary[name] = work()
    except Exception as exc:  # the campaign records a broken section and goes on
        summary[name] = {"held": False, "crashed": f"{type(exc).__name__}: {exc}"}
        summary[name]["traceback"] = traceback.format_exc()[-3000:]
    summary[name]["section_seconds"] = round(time.monotonic() - started)
    print(f"[campaign] {name}: held={summary[name].get('held')}", file=sys.stderr, flush=True)
    for problem in [summary[name].get("crashed"), *summary[name].get("failures", [])[:5]]:
        if problem:
            print(f"[campaign]   {problem}", file=sys.stderr, flush=True)


def run_recovery(summary: dict, args, workdir: Path) -> None:
    """Sections 1 and 2 on one stack: API, redis-server with AOF, one-process workers that honour
    pause plans; short lease and visibility timeout so take-overs happen within seconds."""
    root = (workdir / "recovery-root").resolve()
    root.mkdir(parents=True)
    pause_dir = workdir / "pauses"
    pause_dir.mkdir()
    lease = 3.0
    env = stack_env(
        root,
        FAPM_LEASE_SECONDS=str(int(lease)),
        FAPM_VISIBILITY_TIMEOUT_SECONDS="5",
        FAPM_TEST_PAUSE_DIR=str(pause_dir),
    )
    stack = CampaignStack(workdir / "recovery-stack", env=env)
    stack.workdir.mkdir(parents=True)
    workers = Workers(stack, pause_dir)
    rng = random.Random(args.seed)
    try:
        stack.start_redis()
        stack.start_api()
        if args.kills:
            section(summary, "kill_midjob", lambda: kill_midjob(workers, root, args.kills, rng))
        if args.instant_rounds:
            section(
                summary,
                "kill_instants",
                lambda: kill_instants(workers, root, args.instant_rounds, lease),
            )
        if args.redis_restarts:
            section(
                summary,
                "redis_restart",
                lambda: redis_restarts(workers, root, args.redis_restarts, args.redis_queued),
            )
    finally:
        for process in stack.processes:  # a paused worker would not drain
            if process.name != "redis":
                process.kill(signal.SIGKILL)
        stack.stop()


def stop_unpaused(stack: CampaignStack) -> None:
    """SIGKILL every process but redis-server (a worker holding a POST or a paused job would not
    drain), then stop the stack."""
    for process in stack.processes:
        if process.name != "redis":
            process.kill(signal.SIGKILL)
    stack.stop()


def run_webhooks(summary: dict, args, workdir: Path) -> None:
    """Section 2b on its own stack: redis-server with AOF, the API, one CPU worker (which also
    sweeps owed webhooks) and the `-Q webhooks` worker the section kills and replaces."""
    root = (workdir / "webhooks-root").resolve()
    root.mkdir(parents=True)
    lease = 3.0
    env = stack_env(
        root,
        FAPM_LEASE_SECONDS=str(int(lease)),
        FAPM_VISIBILITY_TIMEOUT_SECONDS="5",
        FAPM_WEBHOOK_TIMEOUT_SECONDS=str(HOOK_TIMEOUT),
        FAPM_WEBHOOK_FIRST_RETRY_SECONDS=str(HOOK_FIRST_RETRY),
        FAPM_WEBHOOK_RETRY_SECONDS="300",
    )
    stack = CampaignStack(workdir / "webhooks-stack", env=env)
    stack.workdir.mkdir(parents=True)
    try:
        stack.start_redis()
        stack.start_api()
        stack.start_worker("runner", extra_args=["-Q", "cpu", "--concurrency", "1"])
        section(
            summary,
            "kill_webhooks",
            lambda: kill_webhooks(stack, root, args.webhook_rounds, lease),
        )
    finally:
        stop_unpaused(stack)


def run_s3(summary: dict, args, workdir: Path) -> None:
    """Section 2c on its own stack: moto_server (every process pointed at it by the standard AWS
    environment), redis-server with AOF, the API and one-process workers whose scratch lives in
    a directory of the section's own (TMPDIR), so the holder of a job and leftovers are found."""
    root = (workdir / "s3-root").resolve()
    scratch = (workdir / "s3-scratch").resolve()
    root.mkdir(parents=True)
    scratch.mkdir()
    env = stack_env(
        root,
        FAPM_LEASE_SECONDS="3",
        FAPM_VISIBILITY_TIMEOUT_SECONDS="5",
        TMPDIR=str(scratch),
    )
    stack = CampaignStack(workdir / "s3-stack", env=env)
    stack.workdir.mkdir(parents=True)
    workers = Workers(stack, workdir / "s3-no-pauses")  # FAPM_TEST_PAUSE_DIR unset: none pause
    rng = random.Random(args.seed)
    try:
        stack.start_s3()
        stack.start_redis()
        stack.start_api()
        section(summary, "kill_s3", lambda: kill_s3(workers, root, args.s3_kills, rng, scratch))
    finally:
        stop_unpaused(stack)


def run_api_only(summary: dict, args, workdir: Path, tally: Tally) -> None:
    root = (workdir / "api-root").resolve()
    for name in ("base", "finetuned", "out"):
        (root / name).mkdir(parents=True)
    keys = {**API_KEYS, "quota": "quota-key-" + os.urandom(6).hex()}
    keys |= {f"load{i}": f"load-key-{i}-{os.urandom(6).hex()}" for i in range(4)}
    env = {
        "FAPM_API_KEYS": ",".join(f"{t}:{k}" for t, k in keys.items()),
        "FAPM_LOCAL_ROOTS": str(root),
        "FAPM_MAX_ACTIVE_JOBS_PER_TENANT": str(10**9),
        "FAPM_HF_WEBHOOK_SECRET": HF_WEBHOOK_SECRET,
    }
    stack = CampaignStack(workdir / "api-stack", env=env)
    stack.workdir.mkdir(parents=True)
    try:
        stack.start_redis()
        stack.start_api()
        section(summary, "submissions", lambda: asyncio.run(_submissions(stack, keys, root, args)))
        section(
            summary, "security_api", lambda: (api_probes(stack, root, tally), {"held": None})[1]
        )
    finally:
        stack.stop()


def run_tenants(summary: dict, workdir: Path, tally: Tally) -> None:
    places = make_places((workdir / "tenants").resolve())
    env = stack_env(
        (workdir / "shared-root").resolve(),
        FAPM_TENANT_LOCATIONS_FILE=str(places["file"]),
        FAPM_WEBHOOK_ALLOW="127.0.0.1",
    )
    (workdir / "shared-root").mkdir()
    stack = CampaignStack(workdir / "tenant-stack", env=env)
    stack.workdir.mkdir(parents=True)
    try:
        stack.start(workers=1)
        section(
            summary, "security_stack", lambda: {"held": None, **tenant_probes(stack, places, tally)}
        )
    finally:
        stack.stop()


def markdown(summary: dict) -> str:
    rows = []

    def row(area: str, tried: str, count, held: str, ok) -> None:
        verdict = "held" if ok else ("FAILED" if ok is False else "-")
        cells = [str(cell).replace("|", "\\|") for cell in (area, tried, count, held, verdict)]
        rows.append("| " + " | ".join(cells) + " |")

    k = summary.get("kill_midjob")
    if k and "crashed" not in k:
        row(
            "Worker SIGKILL mid-job",
            "SIGKILL to the worker's process group mid-prune",
            k["kills"],
            f"{k['succeeded']} succeeded, {k['byte_identical']} byte-identical to "
            f"`fapm prune`; partial output seen in {k['partial_output_seen']} of "
            f"{k['output_polls']:,} polls; recovery s (min/median/max) {shown(k['recovery_seconds'])}",
            k["held"],
        )
    k = summary.get("kill_instants")
    if k and "crashed" not in k:
        row(
            "Worker killed at each instant",
            "taken/noted/started/finished x pool process/whole worker",
            k["kills"],
            f"{k['succeeded']} succeeded, {k['webhook_delivered']} "
            f"webhooks delivered, {k['within_bound']} within {k['bound_seconds']:.0f} s; "
            f"s to job end {shown(k['recovery_seconds'])}, to webhook "
            f"{shown(k['webhook_seconds'])} (min/median/max)",
            k["held"],
        )
    k = summary.get("redis_restart")
    if k and "crashed" not in k:
        row(
            "Redis SIGTERM/SIGKILL",
            "restart with 1 running + queued jobs (AOF everysec)",
            k["restarts"],
            f"{k['jobs_succeeded']}/{k['jobs']} jobs succeeded, {k['lost']} lost, all ended "
            f"{shown(spread(k['seconds_to_all_ended']))} s after the signal; "
            f"API while down: {k['api_while_down']}",
            k["held"],
        )
    k = summary.get("kill_webhooks")
    if k and "crashed" not in k:
        at = ", ".join(f"{state} {n}" for state, n in sorted(k["at_kill"].items()))
        row(
            "Webhooks worker SIGKILL",
            "SIGKILL to the `-Q webhooks` worker's process group with POSTs in flight and "
            "retries counting down; a new one started",
            k["kills"],
            f"{k['delivered_once']} of {k['jobs']} webhooks delivered exactly once "
            f"({k['duplicated']} twice or more, {k['lost']} never), {k['owed_after']} left "
            f"owed; at the kill: {at}; s to delivery from the kill "
            f"{shown(k['seconds_from_kill'])}, from the restart "
            f"{shown(k['seconds_from_restart'])} (min/median/max)",
            k["held"],
        )
    k = summary.get("kill_s3")
    if k and "crashed" not in k:
        points = ", ".join(f"{name} {t['held']}/{t['kills']}" for name, t in k["by_point"].items())
        row(
            "Worker SIGKILL mid-S3-upload",
            "SIGKILL to the worker's process group while shards stream, a multipart upload "
            "runs or the promote copies (moto_server)",
            k["kills"],
            f"{k['succeeded']} succeeded, {k['byte_identical']} byte-identical to `fapm "
            f"prune`; left: {k['staging_left']} staging objects, {k['uploads_left']} "
            f"multipart uploads; manifest listed with an object missing in "
            f"{k['broken_manifest_polls']} of {k['output_polls']:,} polls (objects before "
            f"the manifest in {k['uncommitted_polls']}); held per point: {points}; recovery s "
            f"{shown(k['recovery_seconds'])}",
            k["held"],
        )
    s = summary.get("submissions")
    if s and "crashed" not in s:
        b, i, q = s["burst"], s["idempotency"], s["quota"]
        row(
            "Concurrent submissions",
            "all at once",
            b["sent"],
            f"statuses {b['statuses']}, exactly once in Redis: {b['audit']['exactly_once']}",
            b["held"],
        )
        row(
            "Idempotency keys",
            f"{i['keys']} keys sent 2-5 times at once",
            i["requests"],
            f"{i['keys_with_one_job']} keys with one job, {i['jobs_created']} jobs created "
            f"({i['in_flight_409_then_retried']} in-flight 409s retried)",
            i["held"],
        )
        row(
            "Quota",
            f"limit {q['limit']}, all at once",
            q["sent"],
            f"statuses {q['statuses']}",
            q["held"],
        )
    for probe, t in summary.get("security", {}).items():
        row("Security", probe, t["tried"], f"{t['held']} of {t['tried']}", t["held"] == t["tried"])
    f = summary.get("fuzz")
    if f and "crashed" not in f:
        h = f["headers"]
        row(
            "Fuzz: safetensors headers",
            "structure-aware mutations (the fuzz test's seed)",
            h["cases"],
            f"{h['parsed']} parsed (all match the reference library: "
            f"{h['reference_disagrees'] == 0}), {h['corrupt_checkpoint']} corrupt_checkpoint, "
            f"{h['untyped']} untyped",
            h["untyped"] == 0 and h["reference_disagrees"] == 0,
        )
        for name, d in f["documents"].items():
            row(
                f"Fuzz: {name}",
                "mutated documents",
                d["cases"],
                f"{d['accepted']} accepted, "
                f"{d['typed_error']} typed errors, {d['untyped']} untyped",
                d["untyped"] == 0,
            )
    s = summary.get("schemathesis")
    if s and "crashed" not in s:
        row(
            "schemathesis",
            "`--checks all`, fixed seed, real API",
            s.get("generated", "?"),
            s["line"],
            s["held"],
        )
    for name, value in summary.items():
        if isinstance(value, dict) and "crashed" in value:
            rows.append(f"| {name} | section crashed | - | {value['crashed']} | FAILED |")
    head = "| Area | What was tried | How many | What held | Verdict |\n|---|---|---|---|---|"
    return head + "\n" + "\n".join(rows) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small counts (~20 min, 2 CPUs)")
    parser.add_argument("--kills", type=int, help="worker SIGKILLs mid-job (20; quick 5)")
    parser.add_argument(
        "--instant-rounds", type=int, help="rounds of the 8 instant kills (3; quick 1)"
    )
    parser.add_argument(
        "--redis-restarts", type=int, help="Redis restarts, SIGTERM and SIGKILL alternately (8; 4)"
    )
    parser.add_argument("--redis-queued", type=int, default=4, help="queued jobs per restart")
    parser.add_argument(
        "--webhook-rounds", type=int, help="webhooks worker kills, 6 jobs each (4; quick 2)"
    )
    parser.add_argument("--s3-kills", type=int, help="worker SIGKILLs mid-S3-upload (10; quick 5)")
    parser.add_argument("--burst", type=int, help="submissions at once (2000; quick 500)")
    parser.add_argument("--idempotency-keys", type=int, help="keys sent 2-5 times (300; 100)")
    parser.add_argument("--quota-limit", type=int, default=20)
    parser.add_argument("--quota-burst", type=int, default=500)
    parser.add_argument("--fuzz-headers", type=int, default=12_000)
    parser.add_argument("--fuzz-docs", type=int, default=1_500, help="per document parser")
    parser.add_argument("--no-schemathesis", action="store_true")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument(
        "--only",
        help="comma list: recovery,kill_webhooks,kill_s3,api,tenants,fuzz,schemathesis",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the JSON summary here")
    parser.add_argument("--markdown", metavar="PATH", help="write the Markdown table here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    full = {"kills": 20, "instant_rounds": 3, "redis_restarts": 8, "burst": 2000}
    full |= {"webhook_rounds": 4, "s3_kills": 10}
    quick = {"kills": 5, "instant_rounds": 1, "redis_restarts": 4, "burst": 500}
    quick |= {"webhook_rounds": 2, "s3_kills": 5}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.idempotency_keys is None:
        args.idempotency_keys = 100 if args.quick else 300
    return args


def machine() -> str:
    memory = psutil.virtual_memory().total / 2**30
    return f"{platform.node()}: {os.cpu_count()} CPUs, {memory:.0f} GiB, {platform.platform()}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    workdir = Path(tempfile.mkdtemp(prefix="fapm-campaign-"))
    summary: dict = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "revision": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "counts": vars(args),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    started = time.monotonic()
    tally = Tally()
    try:
        if only is None or "recovery" in only:
            run_recovery(summary, args, workdir)
        if args.webhook_rounds and (only is None or "kill_webhooks" in only):
            run_webhooks(summary, args, workdir)
        if args.s3_kills and (only is None or "kill_s3" in only):
            run_s3(summary, args, workdir)
        if only is None or "api" in only:
            run_api_only(summary, args, workdir, tally)
        if only is None or "tenants" in only:
            run_tenants(summary, workdir, tally)
        summary["security"] = tally.rows
        if only is None or "fuzz" in only:
            section(summary, "fuzz", lambda: fuzz(args.fuzz_headers, args.fuzz_docs))
        if not args.no_schemathesis and (only is None or "schemathesis" in only):
            section(summary, "schemathesis", schemathesis)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary["minutes"] = round((time.monotonic() - started) / 60, 1)
    summary["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    sections = [v for v in summary.values() if isinstance(v, dict) and "held" in v]
    security_held = all(r["held"] == r["tried"] for r in tally.rows.values())
    summary["all_held"] = security_held and all(s["held"] is not False for s in sections)
    print(json.dumps(summary, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text(markdown(summary))
    return 0 if summary["all_held"] else 1


if __name__ == "__main__":
    sys.exit(main())
