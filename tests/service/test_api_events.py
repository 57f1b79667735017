"""GET /v1/jobs/{id}/events over real HTTP: replay of a finished job, resume with Last-Event-ID,
live following until the terminal event, keep-alive comments, and a server whose event loop stays
free while many streams wait. Job events are produced with the JobStore, as a worker does."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx
import pytest

from app.jobs.store import JobStore
from tests.service.conftest import API_KEYS, auth, client


@dataclass
class Stream:
    events: list[dict] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    closed: bool = False
    status_code: int = 0
    content_type: str = ""


def read_stream(
    base_url: str,
    job_id: str,
    *,
    tenant: str = "alice",
    last_event_id: str | None = None,
    timeout: float = 15.0,
    on_event=None,
) -> Stream:
    """Read an events stream to its end (the server closes it) and parse the SSE fields."""
    headers = auth(tenant)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    out = Stream()
    with httpx.stream(
        "GET", f"{base_url}/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
    ) as response:
        out.status_code = response.status_code
        out.content_type = response.headers.get("content-type", "")
        if response.status_code != 200:
            response.read()
            return out
        current: dict = {}
        for line in response.iter_lines():
            if line == "":
                if current:
                    out.events.append(current)
                    if on_event is not None:
                        on_event(current)
                current = {}
            elif line.startswith(":"):
                out.comments.append(line[1:].strip())
            else:
                name, _, value = line.partition(":")
                current[name] = value[1:] if value.startswith(" ") else value
        out.closed = True
    return out


@pytest.fixture(scope="module")
def store(api_stack) -> JobStore:
    return JobStore.from_url(api_stack.redis_url)


@pytest.fixture(autouse=True)
def _release_quota(store):
    yield
    for tenant in API_KEYS:
        for job_id in store.redis.smembers(f"fapm:tenant:{tenant}:active"):
            store.finish(job_id, "cancelled")


@pytest.fixture
def submit(api_stack, local_root):
    def submit_job(tenant: str = "alice") -> str:
        body = {
            "base": str(local_root / "b"),
            "finetuned": str(local_root / "f"),
            "output": str(local_root / "out" / uuid.uuid4().hex),
        }
        with client(api_stack, tenant) as http:
            response = http.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    return submit_job


def progress(i: int, n: int) -> dict:
    return {
        "stage": "prune",
        "tensors_done": i,
        "tensors_total": n,
        "bytes_done": i * 100,
        "bytes_total": n * 100,
        "fraction": i / n,
        "eta_seconds": float(n - i),
    }


def run_to_end(store: JobStore, job_id: str, steps: int = 3) -> None:
    lease = store.start(job_id, lease_seconds=30)
    assert not isinstance(lease, str)
    for i in range(1, steps + 1):
        store.progress(lease, progress(i, steps))
    store.finish(
        job_id,
        "succeeded",
        lease=lease,
        result={"output": "/out", "report": {"tensors": steps}},
        progress={**progress(steps, steps), "stage": "done", "fraction": 1.0},
    )


def test_finished_job_replays_its_history_and_closes(api_stack, store, submit):
    job_id = submit()
    run_to_end(store, job_id, steps=3)
    stream = read_stream(api_stack.api_url, job_id)
    assert stream.status_code == 200
    assert stream.content_type.startswith("text/event-stream")
    assert stream.closed
    kinds = [(e["event"], json.loads(e["data"]).get("status")) for e in stream.events]
    assert kinds == [
        ("state", "queued"),
        ("state", "running"),
        ("progress", None),
        ("progress", None),
        ("progress", None),
        ("state", "succeeded"),
    ]
    # `id:` is the stream entry id, increasing; progress data is the JobProgress object.
    ids = [e["id"] for e in stream.events]
    assert ids == [e[0] for e in store.events(job_id)]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    fractions = [json.loads(e["data"])["fraction"] for e in stream.events[2:5]]
    assert fractions == pytest.approx([1 / 3, 2 / 3, 1.0])
    final = json.loads(stream.events[-1]["data"])
    assert final["result"] == {"output": "/out", "report": {"tensors": 3}}


def test_last_event_id_resumes_after_that_event(api_stack, store, submit):
    job_id = submit()
    run_to_end(store, job_id, steps=4)
    full = read_stream(api_stack.api_url, job_id).events
    resumed = read_stream(api_stack.api_url, job_id, last_event_id=full[2]["id"])
    assert resumed.closed
    assert resumed.events == full[3:]
    # Resuming after the terminal event: nothing more, and the stream closes at once.
    started = time.monotonic()
    after_end = read_stream(api_stack.api_url, job_id, last_event_id=full[-1]["id"])
    assert after_end.closed and after_end.events == []
    assert time.monotonic() - started < 2.0
    # The query parameter does the same for clients that cannot set headers.
    with client(api_stack) as http:
        text = http.get(f"/v1/jobs/{job_id}/events", params={"after": full[-2]["id"]}).text
    assert text.count("event: ") == 1 and '"succeeded"' in text


def test_live_stream_follows_a_running_job_and_closes_after_the_terminal_event(
    api_stack, store, submit
):
    job_id = submit()
    received: list[dict] = []
    first_seen = threading.Event()
    result: dict = {}

    def on_event(event: dict) -> None:
        received.append(event)
        first_seen.set()

    def reader() -> None:
        result["stream"] = read_stream(api_stack.api_url, job_id, on_event=on_event, timeout=30)

    thread = threading.Thread(target=reader)
    thread.start()
    assert first_seen.wait(10)  # the queued event replayed
    lease = store.start(job_id, lease_seconds=30)
    assert not isinstance(lease, str)
    for i in range(1, 6):
        store.progress(lease, progress(i, 5))
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while len(received) < 7 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(received) == 7, received  # queued, running, 5 progress: delivered live
    assert thread.is_alive()  # not finished, so still open
    store.finish(job_id, "failed", lease=lease, error={"code": "boom", "message": "x"})
    thread.join(10)
    assert not thread.is_alive()
    stream = result["stream"]
    assert stream.closed
    assert stream.events[-1]["event"] == "state"
    assert json.loads(stream.events[-1]["data"])["error"]["code"] == "boom"
    fractions = [
        json.loads(e["data"])["fraction"] for e in stream.events if e["event"] == "progress"
    ]
    assert fractions == sorted(fractions)


def test_cancel_of_a_queued_job_ends_its_stream(api_stack, store, submit):
    job_id = submit()
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("s", read_stream(api_stack.api_url, job_id))
    )
    thread.start()
    time.sleep(0.5)
    with client(api_stack) as http:
        assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    thread.join(10)
    assert not thread.is_alive()
    statuses = [json.loads(e["data"])["status"] for e in result["s"].events]
    assert statuses == ["queued", "cancelled"]


def test_events_of_unknown_or_foreign_jobs_are_404_before_streaming(api_stack, submit):
    job_id = submit("alice")
    stream = read_stream(api_stack.api_url, job_id, tenant="bob")
    assert stream.status_code == 404
    assert stream.content_type.startswith("application/problem+json")
    with client(api_stack) as http:
        bad = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "yesterday"})
        assert bad.status_code == 400
        assert bad.json()["code"] == "invalid_last_event_id"


def test_quiet_stream_sends_keep_alive_comments(make_stack, local_root):
    stack = make_stack(FAPM_SSE_KEEPALIVE_SECONDS="0.3")
    stack.start_redis()
    stack.start_api()
    store = JobStore.from_url(stack.redis_url)
    body = {
        "base": str(local_root / "b"),
        "finetuned": str(local_root / "f"),
        "output": str(local_root / "o"),
    }
    with client(stack) as http:
        job_id = http.post("/v1/jobs", json=body).json()["id"]
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("s", read_stream(stack.api_url, job_id))
    )
    thread.start()
    time.sleep(1.5)
    store.finish(job_id, "cancelled")
    thread.join(10)
    stream = result["s"]
    assert stream.closed
    assert stream.comments.count("keep-alive") >= 3
    assert [e["event"] for e in stream.events] == ["state", "state"]


def test_waiting_streams_do_not_block_the_server(api_stack, store, submit):
    """Many open streams wait in XREAD BLOCK on the asyncio client; plain requests still answer
    at once (no thread or event-loop starvation), and every stream then gets its event."""
    jobs = [submit() for _ in range(12)]
    n_streams = 60  # more than the 40 threads of FastAPI's threadpool
    results: list[Stream] = []
    lock = threading.Lock()

    def reader(job_id: str) -> None:
        stream = read_stream(api_stack.api_url, job_id, timeout=30)
        with lock:
            results.append(stream)

    threads = [
        threading.Thread(target=reader, args=(jobs[i % len(jobs)],)) for i in range(n_streams)
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # all connected and waiting
    # Were the streams holding threads or the loop, these requests would wait until the streams
    # end, which happens only below: so a generous bound (for a busy machine) still tells.
    with client(api_stack) as http:
        started = time.monotonic()
        for job_id in jobs:
            assert http.get(f"/v1/jobs/{job_id}", timeout=5).status_code == 200
        assert http.get("/healthz", timeout=5).status_code == 200
        elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"{len(jobs) + 1} requests took {elapsed:.2f} s with streams open"
    for job_id in jobs:
        store.finish(job_id, "cancelled")
    for thread in threads:
        thread.join(15)
    assert len(results) == n_streams
    assert all(s.closed and s.events[-1]["data"].count("cancelled") for s in results)
