"""Submission load on the job API: POST /v1/jobs over HTTP on loopback, then an audit of Redis.

Starts a LocalStack with redis-server and the API only (no worker, so every job stays queued and
the numbers are the API's and Redis's alone), then runs:

  1. open loop: `--total` submissions at a fixed offered rate per `--rate` (several rates: a sweep),
     from up to `--concurrency` connections. A request's latency runs from the moment it was due,
     not from when it got a connection, so a slow server cannot hide its queue behind a slow
     client (no coordinated omission);
  2. closed loop: `--closed-total` submissions from `--closed-concurrency` clients sending back to
     back, for the most the API can take.

Afterwards every returned job id is checked against Redis: exactly one job hash, one entry in its
tenant's index and active set, one `queued` event, one Celery message, none missing, no extras.

The client is one asyncio loop (uvloop when installed) in this process, with a minimal
keep-alive HTTP/1.1 client (`--client raw`, 0.2-0.4 ms CPU per request) or httpx.AsyncClient
(`--client httpx`, 2-10 ms: on 2 cores it cannot offer 200/s itself). Its CPU time and the API's
and Redis's are measured and printed, because on a 2-core machine the client competes with the
server for the same cores; so is what other programs used ("others' cores").

    .venv/bin/python bench/submit_load.py --rate 100,200 --repeat 2 --quiet-wait 60 --markdown
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import redis

from worker.localstack import LocalStack

_HEX32 = re.compile(r"[0-9a-f]{32}")
_LINE_NUMBER = re.compile(r":\d+\)$")


@dataclass
class Sample:
    due: float  # when the request should have been sent (open loop) or was sent (closed loop)
    sent: float = 0.0  # when the client started it (after any wait for the event loop)
    done: float = 0.0
    status: int = 0  # HTTP status, 0 for a transport error
    error: str = ""
    job_id: str = ""
    tenant: str = ""


@dataclass
class Phase:
    name: str
    samples: list[Sample]
    wall: float
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds in the phase


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted `values` (q in 0..100)."""
    if not values:
        return float("nan")
    rank = max(1, min(len(values), int(-(-q * len(values) // 100))))
    return values[rank - 1]


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams: POST with a JSON body, read a
    Content-Length (or chunked) answer. About a tenth of httpx's CPU per request (measured: see
    bench/RESULTS.md), which matters when the client shares 2 cores with the server it measures.
    """

    # uvicorn closes a connection idle for 5 s (--timeout-keep-alive); a request written into
    # one it is closing fails, so a connection idle for longer than this is replaced first.
    IDLE_SECONDS = 3.0

    def __init__(self, api_url: str, connections: int) -> None:
        url = httpx.URL(api_url)
        self.host, self.port = url.host, url.port or 80
        # FIFO: requests rotate over all connections, so with several API worker processes the
        # load spreads over every process that accepted one (a LIFO pool reuses the few on top).
        self.pool: asyncio.Queue = asyncio.Queue()
        for _ in range(connections):
            self.pool.put_nowait(None)  # a slot; connected on first use

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        conn = await self.pool.get()
        try:
            if conn is not None and (
                time.monotonic() - conn[2] > self.IDLE_SECONDS or conn[0].at_eof()
            ):
                conn[1].close()
                conn = None
            if conn is None:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            else:
                reader, writer, _ = conn
            conn = (reader, writer, 0.0)
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{head}"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status, response, keep = await self._read(reader)
            if keep:
                conn = (reader, writer, time.monotonic())
            else:
                writer.close()
                conn = None
            return status, response
        except BaseException:
            if conn is not None:
                conn[1].close()
            conn = None
            raise
        finally:
            self.pool.put_nowait(conn)

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        keep = fields.get("connection", "").lower() != "close"
        if "content-length" in fields:
            return status, await reader.readexactly(int(fields["content-length"])), keep
        if fields.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")
            return status, b"".join(chunks), keep
        return status, await reader.read(), False

    async def aclose(self) -> None:
        while not self.pool.empty():
            conn = self.pool.get_nowait()
            if conn is not None:
                conn[1].close()


class Load:
    """Submits job bodies for a set of tenants over one pooled async HTTP client."""

    def __init__(
        self, api_url: str, keys: dict[str, str], root: Path, concurrency: int, kind: str
    ) -> None:
        self.keys = keys
        self.tenants = sorted(keys)
        self.root = root
        self.kind = kind
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        # pool=None: a request waiting for a free connection waits (and its latency shows it).
        timeout = httpx.Timeout(30.0, pool=None)
        self.client = httpx.AsyncClient(base_url=api_url, limits=limits, timeout=timeout)
        self.raw = RawHttp(api_url, concurrency) if kind == "raw" else None
        self.idempotency = False

    def body(self, phase: str, i: int) -> dict:
        return {
            "base": f"file://{self.root}/base",
            "finetuned": f"file://{self.root}/finetuned",
            "output": f"file://{self.root}/out/{phase}-{i}",
            "method": "fapm",
            "sparsity": 0.9,
            "labels": {"bench": phase},
        }

    async def submit(self, phase: str, i: int, sample: Sample) -> None:
        tenant = self.tenants[i % len(self.tenants)]
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        if self.idempotency:
            headers["Idempotency-Key"] = f"{phase}-{i}"
        sample.tenant = tenant
        sample.sent = time.perf_counter()
        try:
            if self.raw is not None:
                body = json.dumps(self.body(phase, i)).encode()
                status, answer = await self.raw.post("/v1/jobs", body, headers)
            else:
                response = await self.client.post(
                    "/v1/jobs", json=self.body(phase, i), headers=headers
                )
                status, answer = response.status_code, response.content
            sample.status = status
            if status == 202:
                sample.job_id = json.loads(answer)["id"]
            else:
                sample.error = answer[:200].decode(errors="replace")
        except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            sample.error = f"{type(exc).__name__}: {exc}"
        sample.done = time.perf_counter()

    async def open_loop(self, phase: str, total: int, rate: float) -> list[Sample]:
        """`total` requests, request i due at start + i/rate, each sent when due whatever the
        others are doing (they queue for a connection beyond the pool size)."""
        start = time.perf_counter() + 0.05
        samples = [Sample(due=start + i / rate) for i in range(total)]
        tasks = []
        i = 0
        while i < total:
            now = time.perf_counter()
            while i < total and samples[i].due <= now:
                tasks.append(asyncio.create_task(self.submit(phase, i, samples[i])))
                i += 1
            if i < total:
                await asyncio.sleep(max(0.0, samples[i].due - time.perf_counter()))
        await asyncio.gather(*tasks)
        return samples

    async def closed_loop(self, phase: str, total: int, concurrency: int) -> list[Sample]:
        """`concurrency` clients, each sending its next request as soon as the last answered."""
        samples: list[Sample] = []
        counter = iter(range(total))

        async def client_loop() -> None:
            for i in counter:
                sample = Sample(due=time.perf_counter())
                samples.append(sample)
                await self.submit(phase, i, sample)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return samples


class CpuMeter:
    """CPU seconds of this process (the client), the API (with its workers) and redis-server."""

    def __init__(self, stack: LocalStack) -> None:
        self.processes = {p.name: psutil.Process(p.popen.pid) for p in stack.processes}

    def read(self) -> dict[str, float]:
        # "machine": busy CPU seconds of the whole machine, so that what other programs used in
        # a phase (others = machine - ours) shows up next to the numbers it disturbed.
        machine = psutil.cpu_times()
        out = {
            "client": time.process_time(),
            "machine": sum(machine) - machine.idle - machine.iowait,
        }
        for name, process in self.processes.items():
            total = 0.0
            for proc in [process, *process.children(recursive=True)]:
                try:
                    times = proc.cpu_times()
                    total += times.user + times.system
                except psutil.NoSuchProcess:
                    pass
            out[name] = total
        return out


async def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most `max_wait` s) until the machine is idle but for us (others' tests share
    these 2 cores); returns the busy cores of the last 1 s sample."""
    deadline = time.monotonic() + max_wait
    while True:
        before = psutil.cpu_times()
        await asyncio.sleep(1.0)
        after = psutil.cpu_times()
        busy = (sum(after) - after.idle - after.iowait) - (
            sum(before) - before.idle - before.iowait
        )
        if busy < threshold or time.monotonic() >= deadline:
            return busy


async def run_phase(load: Load, meter: CpuMeter, name: str, coro_factory) -> Phase:
    before = meter.read()
    started = time.perf_counter()
    samples = await coro_factory()
    wall = time.perf_counter() - started
    after = meter.read()
    cpu = {k: after[k] - before[k] for k in after}
    machine = cpu.pop("machine")
    cpu["others"] = max(0.0, machine - sum(cpu.values()))
    first = min(s.due for s in samples)
    last = max(s.done for s in samples)
    return Phase(name, samples, wall=last - first if samples else wall, cpu=cpu)


def summarize(phase: Phase) -> dict:
    ok = [s for s in phase.samples if s.status == 202]
    latencies = sorted((s.done - s.due) * 1000 for s in phase.samples)
    service = sorted((s.done - s.sent) * 1000 for s in phase.samples)
    errors = Counter(
        str(s.status) if s.status else s.error.split(":")[0]
        for s in phase.samples
        if s.status != 202
    )
    n = len(phase.samples)
    return {
        "phase": phase.name,
        "requests": n,
        "ok": len(ok),
        "errors": dict(errors),
        "throughput": len(ok) / phase.wall if phase.wall else 0.0,
        "p50": percentile(latencies, 50),
        "p90": percentile(latencies, 90),
        "p99": percentile(latencies, 99),
        "max": latencies[-1] if latencies else float("nan"),
        "service_p99": percentile(service, 99),
        "cpu_ms_per_request": {k: v * 1000 / n for k, v in phase.cpu.items()} if n else {},
        "cpu_cores": {k: v / phase.wall for k, v in phase.cpu.items()} if phase.wall else {},
    }


def _celery_job_ids(client: redis.Redis, job_ids: set[str]) -> tuple[int, Counter] | None:
    """(messages, job id -> how many messages name it) over the broker's queue lists, or None
    if no Celery messages are found (an API that enqueues some other way)."""
    counts: Counter = Counter()
    messages = 0
    for key in client.scan_iter(count=1000):
        name = key.decode(errors="replace")
        if name.startswith(("fapm:", "_kombu", "unacked")) or client.type(key) != b"list":
            continue
        for raw in client.lrange(key, 0, -1):
            messages += 1
            try:
                message = json.loads(raw)
                headers = message.get("headers") or {}
                text = json.dumps(headers) + base64.b64decode(message.get("body", "")).decode(
                    errors="replace"
                )
            except (ValueError, TypeError):
                text = raw.decode(errors="replace")
            # A message names its job once or more (task id, args): count each job once a message.
            for job_id in _ids_in(text, job_ids):
                counts[job_id] += 1
    return (messages, counts) if messages else None


def _ids_in(text: str, job_ids: set[str]) -> set[str]:
    """Our job ids in `text`: job ids are 32 hex digits, so test each such run, not every id."""
    return {m for m in _HEX32.findall(text) if m in job_ids}


def verify(redis_url: str, submitted: list[Sample]) -> dict:
    """Every 202's job id in Redis exactly once; nothing else there."""
    client = redis.Redis.from_url(redis_url)
    ids = [s.job_id for s in submitted if s.job_id]
    id_set = set(ids)
    duplicates_returned = len(ids) - len(id_set)
    hashes = set()
    for key in client.scan_iter(match="fapm:job:*", count=5000):
        name = key.decode()
        rest = name.removeprefix("fapm:job:")
        if ":" not in rest:
            hashes.add(rest)
    per_tenant: dict[str, list[str]] = {}
    for s in submitted:
        if s.job_id:
            per_tenant.setdefault(s.tenant, []).append(s.job_id)
    index_problems = 0
    index_entries = 0
    for tenant, tenant_ids in per_tenant.items():
        indexed = [m.decode() for m in client.zrange(f"fapm:tenant:{tenant}:jobs", 0, -1)]
        active = {m.decode() for m in client.smembers(f"fapm:tenant:{tenant}:active")}
        index_entries += len(indexed)
        if sorted(indexed) != sorted(tenant_ids) or active != set(tenant_ids):
            index_problems += 1
    # Each job: queued, of the right tenant, with exactly one event (its creation).
    bad_records = 0
    event_counts: Counter = Counter()
    with client.pipeline(transaction=False) as pipe:
        for s in submitted:
            if s.job_id:
                pipe.hmget(f"fapm:job:{s.job_id}", "status", "tenant")
                pipe.xlen(f"fapm:job:{s.job_id}:events")
        replies = pipe.execute()
    for s, (fields, events) in zip(
        [s for s in submitted if s.job_id],
        zip(replies[::2], replies[1::2], strict=True),
        strict=True,
    ):
        status, tenant = (v.decode() if v else None for v in fields)
        if status != "queued" or tenant != s.tenant:
            bad_records += 1
        event_counts[events] += 1
    celery = _celery_job_ids(client, id_set)
    pending = client.zcard("fapm:pending-enqueue")
    result = {
        "returned_ids": len(ids),
        "duplicate_ids_returned": duplicates_returned,
        "job_hashes": len(hashes),
        "missing_in_redis": len(id_set - hashes),
        "extra_in_redis": len(hashes - id_set),
        "tenant_index_entries": index_entries,
        "tenant_index_mismatches": index_problems,
        "records_not_queued_or_wrong_tenant": bad_records,
        "jobs_with_events_other_than_1": sum(v for k, v in event_counts.items() if k != 1),
        "pending_enqueue_left": pending,
    }
    if celery is not None:
        messages, counts = celery
        result["celery_messages"] = messages
        result["jobs_without_message"] = len(id_set - set(counts))
        result["jobs_with_several_messages"] = sum(1 for c in counts.values() if c > 1)
    ok = (
        duplicates_returned == 0
        and result["missing_in_redis"] == 0
        and result["extra_in_redis"] == 0
        and index_problems == 0
        and bad_records == 0
        and result["jobs_with_events_other_than_1"] == 0
        and (
            celery is None
            or (
                result["jobs_without_message"] == 0
                and result["jobs_with_several_messages"] == 0
                and result["celery_messages"] == len(id_set)
            )
        )
    )
    result["exactly_once"] = ok
    client.close()
    return result


def start_py_spy(stack: LocalStack, path: str) -> subprocess.Popen:
    """py-spy sampling the API process (and its uvicorn workers), in `raw` (collapsed) form.
    It runs in its own process: it takes some CPU, which the 'others' column counts."""
    api = next(p for p in stack.processes if p.name == "api")
    binary = Path(sys.executable).with_name("py-spy")
    argv = [str(binary), "record", "--pid", str(api.popen.pid), "--subprocesses", "--format"]
    # --gil: only samples holding the GIL, i.e. Python CPU work (idle pool threads drop out)
    argv += ["raw", "--gil", "--rate", "200", "--output", path, "--nonblocking"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches before the first measured request
    return process


def stop_py_spy(process: subprocess.Popen, path: str, top: int = 25) -> None:
    """Stop py-spy (SIGINT makes it write its file) and print where the API spent its samples:
    per frame, the share of samples with that frame on the stack (inclusive) and on top (self)."""
    process.send_signal(signal.SIGINT)
    process.wait(60)
    inclusive: Counter = Counter()
    own: Counter = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        # "function (file:line)" -> "function (file)": one entry per function, not per line
        frames = [_LINE_NUMBER.sub(")", f) for f in stack.split(";")]
        n = int(count)
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    print(f"py-spy: {total} samples of the API holding the GIL", file=sys.stderr)
    for frame, n in inclusive.most_common(top):
        print(
            f"  {100 * n / total:5.1f}% incl {100 * own[frame] / total:5.1f}% self  {frame}",
            file=sys.stderr,
        )


def _fmt_errors(errors: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"


def markdown(summaries: list[dict], audit: dict, meta: dict) -> str:
    lines = [
        "| phase | requests | ok | errors | throughput /s | p50 ms | p90 ms | p99 ms | max ms "
        "| client CPU ms/req | API CPU ms/req | redis CPU ms/req | API cores | others' cores |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for s in summaries:
        cpu = s["cpu_ms_per_request"]
        lines.append(
            f"| {s['phase']} | {s['requests']} | {s['ok']} | {_fmt_errors(s['errors'])} "
            f"| {s['throughput']:.0f} | {s['p50']:.1f} | {s['p90']:.1f} | {s['p99']:.1f} "
            f"| {s['max']:.1f} | {cpu.get('client', 0):.2f} | {cpu.get('api', 0):.2f} "
            f"| {cpu.get('redis', 0):.2f} | {s['cpu_cores'].get('api', 0):.2f} "
            f"| {s['cpu_cores'].get('others', 0):.2f} |"
        )
    lines.append("")
    lines.append(
        f"Redis audit after {audit['returned_ids']} accepted submissions: "
        + ", ".join(f"{k} {v}" for k, v in audit.items())
    )
    lines.append("")
    lines.append(", ".join(f"{k}: {v}" for k, v in meta.items()))
    return "\n".join(lines)


def app_revision() -> str:
    """The commit the measured API code is at, '+dirty' if app/ has uncommitted changes (the API
    changes under a shared checkout; numbers belong to one revision)."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, check=False
        ).stdout.strip()

    dirty = git("status", "--porcelain", "--", "app", "worker/celery_app.py")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rate", default="200", help="offered rate(s), submissions/s: 200 or 100,200,400"
    )
    parser.add_argument("--total", type=int, default=2000, help="submissions per open-loop rate")
    parser.add_argument("--concurrency", type=int, default=64, help="open-loop connections")
    parser.add_argument(
        "--closed-total", type=int, default=2000, help="closed-loop submissions (0: skip)"
    )
    parser.add_argument("--closed-concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--warmup", type=int, default=200, help="unreported submissions first")
    parser.add_argument("--repeat", type=int, default=1, help="run every phase this often")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each phase, wait up to this many s for other programs to go idle",
    )
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="raw: a minimal keep-alive HTTP/1.1 client (least CPU); httpx: httpx.AsyncClient",
    )
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument(
        "--idempotency-keys",
        action="store_true",
        help="send an Idempotency-Key with each submission",
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the stack's files (logs) in place"
    )
    parser.add_argument(
        "--py-spy",
        metavar="PATH",
        help="sample the API with py-spy during the measured phases; collapsed stacks to PATH "
        "and the top frames printed",
    )
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json", metavar="PATH", help="also write the raw summaries as JSON")
    return parser.parse_args(argv)


async def run(
    args: argparse.Namespace, stack: LocalStack, keys: dict[str, str], root: Path
) -> tuple[list[dict], dict]:
    connections = max(args.concurrency, args.closed_concurrency)
    load = Load(stack.api_url, keys, root, connections, args.client)
    load.idempotency = args.idempotency_keys
    meter = CpuMeter(stack)
    everything: list[Sample] = []
    summaries = []
    async with load.client:
        # The API answers /healthz before its first request has warmed imports and pools.
        for _ in range(100):
            try:
                if (await load.client.get("/healthz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        if args.warmup:
            warm = await load.closed_loop("warmup", args.warmup, 4)
            everything += warm
        profiler = start_py_spy(stack, args.py_spy) if args.py_spy else None
        phases = [
            (f"open loop {rate:g}/s", lambda tag, r=rate: load.open_loop(tag, args.total, r))
            for rate in (float(r) for r in args.rate.split(","))
        ]
        if args.closed_total:
            phases.append(
                (
                    f"closed loop x{args.closed_concurrency}",
                    lambda tag: load.closed_loop(tag, args.closed_total, args.closed_concurrency),
                )
            )
        for repeat in range(args.repeat):
            for name, make in phases:
                await wait_for_quiet(args.quiet_wait)
                tag = f"{name.replace(' ', '-').replace('/', '')}-{repeat}"
                phase = await run_phase(load, meter, name, lambda m=make, t=tag: m(t))
                everything += phase.samples
                summaries.append(summarize(phase))
        if load.raw is not None:
            await load.raw.aclose()
    if profiler is not None:
        stop_py_spy(profiler, args.py_spy)
    audit = verify(stack.redis_url, everything)
    return summaries, audit


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop

        uvloop.install()
        loop_name = "uvloop"
    except ImportError:
        loop_name = "asyncio"
    workdir = Path(tempfile.mkdtemp(prefix="fapm-submit-load-"))
    root = (workdir / "root").resolve()
    for name in ("base", "finetuned", "out"):
        (root / name).mkdir(parents=True)
    keys = {f"tenant{i}": f"bench-key-{i}-{os.urandom(8).hex()}" for i in range(args.tenants)}
    env = {
        "FAPM_API_KEYS": ",".join(f"{t}:{k}" for t, k in keys.items()),
        "FAPM_MAX_ACTIVE_JOBS_PER_TENANT": str(10**9),
        "FAPM_LOCAL_ROOTS": str(root),
    }
    stack = LocalStack(workdir / "stack", env=env)
    stack.workdir.mkdir(parents=True, exist_ok=True)
    try:
        stack.start_redis()
        stack.start_api(
            {"UVICORN_WORKERS": str(args.api_workers)} if args.api_workers > 1 else None
        )
        summaries, audit = asyncio.run(run(args, stack, keys, root))
    finally:
        stack.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    meta = {
        "app/ at": app_revision(),
        "client": f"one {loop_name} loop, "
        + (
            "minimal HTTP/1.1 keep-alive client"
            if args.client == "raw"
            else f"httpx {httpx.__version__} AsyncClient pool"
        ),
        "api workers": args.api_workers,
        "tenants": args.tenants,
        "open-loop connections": args.concurrency,
        "idempotency keys": args.idempotency_keys,
        "cores": os.cpu_count(),
    }
    if args.json:
        Path(args.json).write_text(
            json.dumps({"summaries": summaries, "audit": audit, "meta": meta}, indent=2)
        )
    if args.markdown:
        print(markdown(summaries, audit, meta))
    else:
        for s in summaries:
            print(json.dumps(s))
        print(json.dumps(audit))
        print(json.dumps(meta))
    return 0 if audit["exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
