"""The Celery worker against real processes: redis-server and `celery -A worker.celery_app worker`.

Life cycle with output equal to an in-process `run_prune`, monotone progress, cancellation of a
running and of a queued job, failures with stable codes. The kill test and the webhook tests are
in their own modules and reuse the helpers here.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.jobs.records import TERMINAL_STATUSES, JobRecord, JobRequest
from app.jobs.store import JobStore, new_job_id
from tests.service.conftest import client
from worker.celery_app import RUN_JOB_TASK, celery_app
from worker.engine.pipeline import REPORT_FILE, Progress, run_prune
from worker.io.staging import STAGING_MARK
from worker.localstack import LocalStack
from worker.spec import JobSpec
from worker.tasks.progress import ProgressReporter

# A pair the torch kernel needs a few seconds for on 2 cores (32 tensors of 256 x 1024 bf16), so
# a test can act while the job runs. kernel=torch: numba would JIT-compile first.
BIG_TENSORS, BIG_ROWS, BIG_COLS = 32, 256, 1024


# -- helpers shared by the worker test modules ------------------------------------------------------


def write_big_pair(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """A base and fine-tuned safetensors checkpoint (no config: the engine does not need one)."""
    base_dir, ft_dir = directory / "base", directory / "finetuned"
    if (ft_dir / "model.safetensors").exists():
        return base_dir, ft_dir
    generator = torch.Generator().manual_seed(seed)
    base = {
        f"model.layers.{i}.mlp.weight": torch.randn(BIG_ROWS, BIG_COLS, generator=generator).to(
            torch.bfloat16
        )
        for i in range(BIG_TENSORS)
    }
    finetuned = {
        name: (w.float() + 0.01 * torch.randn(w.shape, generator=generator)).to(torch.bfloat16)
        for name, w in base.items()
    }
    for path, tensors in ((base_dir, base), (ft_dir, finetuned)):
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path / "model.safetensors")
    return base_dir, ft_dir


class Jobs:
    """Submits, reads and cancels one stack's jobs: over HTTP as tenant alice when the stack runs
    the API, else the way the API does it (JobStore.create, then enqueue). `enqueue=False`
    writes a job that stays queued (no message yet) to test what a worker does with it later."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.store = JobStore.from_url(stack.redis_url)
        self.api = client(stack, "alice") if stack.api_port else None

    def submit(
        self, spec: dict, *, webhook: dict | None = None, enqueue: bool = True, queue: str = "cpu"
    ) -> str:
        if self.api is not None and enqueue:
            body = {**spec, **({"webhook": webhook} if webhook else {})}
            response = self.api.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            return response.json()["id"]
        request = JobRequest.model_validate({**spec, "webhook": webhook})
        job_id = new_job_id()
        outcome = self.store.create(
            job_id=job_id,
            tenant="alice",
            queue=queue,
            spec_json=request.spec().model_dump(mode="json"),
            labels={},
            webhook_url=str(request.webhook.url) if request.webhook else None,
            webhook_secret=(
                request.webhook.secret.get_secret_value()
                if request.webhook and request.webhook.secret
                else None
            ),
            max_active=1000,
        )
        assert outcome.kind == "created"
        if enqueue:
            self.enqueue(job_id, queue)
        return job_id

    def enqueue(self, job_id: str, queue: str = "cpu") -> None:
        with celery_app.connection_for_write(self.stack.redis_url) as connection:
            celery_app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, connection=connection)
        self.store.mark_enqueued(job_id)

    def get(self, job_id: str) -> JobRecord:
        if self.api is not None:
            response = self.api.get(f"/v1/jobs/{job_id}")
            assert response.status_code == 200, response.text
            return JobRecord.model_validate(response.json())
        record = self.store.get(job_id)
        assert record is not None
        return record

    def report(self, job_id: str) -> dict | None:
        if self.api is not None:
            response = self.api.get(f"/v1/jobs/{job_id}/report")
            return response.json() if response.status_code == 200 else None
        return self.store.report(job_id)

    def cancel(self, job_id: str) -> str:
        """'cancelled' (it was queued) or 'requested' (it was running)."""
        if self.api is not None:
            response = self.api.post(f"/v1/jobs/{job_id}/cancel")
            assert response.status_code == 202, response.text
            record = response.json()
            return "cancelled" if record["status"] == "cancelled" else "requested"
        return self.store.request_cancel(job_id)

    def wait(
        self,
        job_id: str,
        until: Callable[[JobRecord], bool] = lambda r: r.status in TERMINAL_STATUSES,
        timeout: float = 120,
        every: float = 0.02,
        seen: list[JobRecord] | None = None,
    ) -> JobRecord:
        deadline = time.monotonic() + timeout
        while True:
            record = self.get(job_id)
            if seen is not None:
                seen.append(record)
            if until(record):
                return record
            if time.monotonic() > deadline:
                logs = sorted(self.stack.workdir.glob("*.log"))
                tail = "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in logs)
                raise AssertionError(f"job {job_id} still {record.status}:\n{tail}")
            time.sleep(every)


def staging_dirs(output: Path) -> list[str]:
    return [p.name for p in output.parent.iterdir() if STAGING_MARK in p.name]


def assert_same_output(out: Path, reference: Path) -> None:
    """Weights and side files byte for byte; the card and the report up to the output path, the
    job id and timings."""
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in reference.iterdir())
    for name in names:
        if name in ("README.md", REPORT_FILE):
            continue
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    card = (reference / "README.md").read_text().replace(str(reference), str(out))
    assert (out / "README.md").read_text() == card
    ours, theirs = (json.loads((d / REPORT_FILE).read_text()) for d in (out, reference))
    for report in (ours, theirs):
        for record in report["tensors"]:
            record.pop("seconds")
    for key in ("totals", "output", "tensors", "implementation", "inputs"):
        assert ours[key] == theirs[key], key


def reference_output(spec: dict, directory: Path) -> Path:
    """The same job run in this process, as `fapm prune` runs it; kept in `directory` by spec."""
    key = hashlib.sha256(json.dumps({**spec, "output": None}, sort_keys=True).encode())
    out = directory / f"reference-{key.hexdigest()[:16]}"
    if not out.exists():
        run_prune(JobSpec.model_validate({**spec, "output": str(out)}))
    return out


class OutputWatcher(threading.Thread):
    """Polls an output path until stopped and records every state it saw: a directory at the
    output path must always be complete (it appears by one rename, report included)."""

    def __init__(self, output: Path) -> None:
        super().__init__(daemon=True)
        self.output = output
        self.partial: list[list[str]] = []
        self.complete_seen = False
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                names = sorted(p.name for p in self.output.iterdir())
            except FileNotFoundError:
                names = None
            if names is not None:
                if REPORT_FILE in names and "model.safetensors" in names:
                    self.complete_seen = True
                else:
                    self.partial.append(names)
            time.sleep(0.002)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jobs(service) -> Jobs:
    """The session's service stack (redis-server, API, one worker), driven over HTTP."""
    return Jobs(service)


@pytest.fixture(scope="session")
def big_pair(local_root) -> tuple[Path, Path]:
    return write_big_pair(local_root / "big_pair")


@pytest.fixture
def references(local_root) -> Path:
    """Where reference_output() keeps its runs: under the session's local root, so the worker
    test modules share them."""
    return local_root / "references"


def big_spec(big_pair: tuple[Path, Path], output: Path, **extra: object) -> dict:
    base, finetuned = big_pair
    return {
        "base": str(base),
        "finetuned": str(finetuned),
        "output": str(output),
        "kernel": "torch",
        **extra,
    }


# -- tests ----------------------------------------------------------------------------------------


def test_job_runs_to_success_with_monotone_progress_and_the_cli_bytes(
    jobs, big_pair, local_root, references
):
    out = local_root / "lifecycle" / "out"
    spec = big_spec(big_pair, out)
    job_id = jobs.submit(spec)
    watcher = OutputWatcher(out)
    watcher.start()
    seen: list[JobRecord] = []
    try:
        record = jobs.wait(job_id, seen=seen)
    finally:
        watcher.stop()
    assert record.status == "succeeded", record.error

    statuses = [r.status for r in seen]
    assert statuses.index("running") < statuses.index("succeeded")
    assert "queued" not in statuses[statuses.index("running") :]
    fractions = [r.progress.fraction for r in seen]
    assert fractions == sorted(fractions), "progress went backwards"
    running = [r.progress for r in seen if r.status == "running"]
    assert any(0 < p.fraction < 1 and p.stage == "prune" for p in running), running[-3:]
    assert any(p.eta_seconds is not None and p.eta_seconds > 0 for p in running)
    prune = [p for p in running if p.stage == "prune"]
    assert [p.bytes_done for p in prune] == sorted(p.bytes_done for p in prune)
    assert record.progress.fraction == 1.0 and record.progress.stage == "done"
    assert record.progress.tensors_done == record.progress.tensors_total == BIG_TENSORS
    assert record.progress.bytes_done == record.progress.bytes_total > 0
    assert record.attempts == 1 and record.started_at and record.finished_at
    assert record.error is None and not watcher.partial and watcher.complete_seen

    assert record.result is not None and record.result.output == str(out)
    summary = record.result.report
    assert summary["job_id"] == job_id
    assert summary["output"]["shards"][0]["file"] == "model.safetensors"
    assert summary["implementation"] and summary["totals"] and summary["seconds"]["total"] > 0
    full = jobs.report(job_id)
    assert full is not None and full["job_id"] == job_id and len(full["tensors"]) == BIG_TENSORS
    assert json.loads((out / REPORT_FILE).read_text())["job_id"] == job_id

    assert_same_output(out, reference_output(spec, references))
    assert staging_dirs(out) == []
    stats = jobs.store.stats()
    assert stats["duration_count"] >= 1 and stats["bytes_processed"] > 0


def test_scope_model_job_matches_the_cli(jobs, service_pair, local_root, references):
    spec = {
        "base": str(service_pair.base),
        "finetuned": str(service_pair.finetuned),
        "output": str(local_root / "scope_model" / "out"),
        "method": "magnitude",
        "scope": "model",
        "sparsity": 0.8,
    }
    record = jobs.wait(jobs.submit(spec))
    assert record.status == "succeeded", record.error
    assert record.progress.fraction == 1.0
    assert_same_output(Path(spec["output"]), reference_output(spec, references))


def test_cancel_of_a_running_job_stops_it_and_leaves_nothing(jobs, big_pair, local_root):
    out = local_root / "cancel_running" / "out"
    job_id = jobs.submit(big_spec(big_pair, out))
    jobs.wait(job_id, lambda r: r.status == "running" and r.progress.stage == "prune")
    assert jobs.cancel(job_id) == "requested"
    record = jobs.wait(job_id, timeout=30)
    assert record.status == "cancelled"
    assert record.error is not None and record.error.code == "cancelled"
    assert record.progress.fraction < 1.0 and record.result is None
    assert not out.exists() and staging_dirs(out) == []


def test_a_job_cancelled_while_queued_never_starts(jobs, service_pair, local_root):
    out = local_root / "cancel_queued" / "out"
    spec = {
        "base": str(service_pair.base),
        "finetuned": str(service_pair.finetuned),
        "output": str(out),
    }
    job_id = jobs.submit(spec, enqueue=False)
    assert jobs.cancel(job_id) == "cancelled"
    jobs.enqueue(job_id)  # the message still reaches a worker, which must drop it
    # A job queued behind it has run, so the worker has taken the cancelled one's message.
    after = jobs.wait(jobs.submit({**spec, "output": str(out.with_name("after"))}))
    assert after.status == "succeeded"
    deadline = time.monotonic() + 10
    while jobs.store.redis.llen("cpu") and time.monotonic() < deadline:
        time.sleep(0.05)
    record = jobs.get(job_id)
    assert record.status == "cancelled" and record.attempts == 0 and record.started_at is None
    assert not out.exists()


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("missing_base", "source_not_found"),
        ("other_architecture", "architecture_mismatch"),
        ("output_exists", "output_exists"),
        ("output_under_a_file", "internal_error"),
    ],
)
def test_bad_jobs_fail_with_a_stable_code(jobs, service_pair, big_pair, local_root, case, code):
    out = local_root / "failures" / case / "out"
    spec = {
        "base": str(service_pair.base),
        "finetuned": str(service_pair.finetuned),
        "output": str(out),
    }
    if case == "missing_base":
        spec["base"] = str(local_root / "no-such-model")
    elif case == "other_architecture":
        spec["finetuned"] = str(big_pair[1])
    elif case == "output_exists":
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("not ours")
    else:  # an OSError the engine has no code for: internal_error, no details leaked
        out.parent.parent.mkdir(parents=True, exist_ok=True)
        out.parent.write_text("a file where the output's parent should be")
    record = jobs.wait(jobs.submit(spec))
    assert record.status == "failed"
    assert record.error is not None and record.error.code == code, record.error
    assert record.error.message and record.result is None
    if case == "output_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    elif case == "output_under_a_file":
        assert str(out.parent) not in record.error.message
        return
    else:
        assert not out.exists()
    assert staging_dirs(out) == []


def test_worker_heartbeat_names_its_queues(jobs):
    workers = jobs.store.fresh_workers(max_age=5)
    assert len(workers) == 1
    (host, info), *_ = workers.items()
    assert host.startswith("worker@")
    assert info["gpu"] == torch.cuda.is_available()
    expected = {"cpu", "webhooks"} | ({"gpu"} if info["gpu"] else set())
    assert set(info["queues"]) == expected


def test_progress_fraction_spans_all_passes_and_writes_at_a_bounded_rate(
    jobs, service_pair, tmp_path
):
    """ProgressReporter against the real store: scope model's three passes share the prune's
    span, the fraction never drops across stages, and writes come on stage changes plus at most
    one per interval."""
    job_id = jobs.submit(
        {"base": str(service_pair.base), "finetuned": str(service_pair.finetuned),
         "output": str(tmp_path / "never")},
        enqueue=False,
    )  # fmt: skip
    lease = jobs.store.start(job_id, 60)
    assert not isinstance(lease, str)
    now = [0.0]
    reporter = ProgressReporter(jobs.store, lease, "model", interval=1.0, clock=lambda: now[0])
    events = [Progress("plan")]
    for stage, total in (("scan1", 8), ("scan2", 8), ("prune", 10)):
        events += [Progress(stage, i, total, i * 100, total * 100) for i in range(total + 1)]
    events += [Progress("finalize", 10, 10), Progress("done", 10, 10)]
    fractions = []
    for event in events:
        now[0] += 0.1
        reporter(event)
        fractions.append(reporter.fraction)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    ends = {e.stage: f for e, f in zip(events, fractions, strict=True)}
    assert ends["scan1"] == pytest.approx(0.02 + 0.95 / 3) and ends["prune"] == pytest.approx(0.97)

    writes = [json.loads(data) for _, kind, data in jobs.store.events(job_id) if kind == "progress"]
    stages = ["plan", "scan1", "scan2", "prune", "finalize", "done"]
    assert sorted({w["stage"] for w in writes}, key=stages.index) == stages
    assert len(writes) <= len(stages) + int(now[0] / 1.0) + 1
    assert writes[-1]["fraction"] == 1.0
    eta = [w["eta_seconds"] for w in writes if w["stage"] == "prune"]
    assert all(e is not None and e >= 0 for e in eta)
    assert jobs.store.finish(job_id, "cancelled", lease=lease)


def test_worker_rechecks_local_roots_before_it_opens_a_path(
    jobs, service_pair, local_root, tmp_path
):
    """The API checked the paths at submission; a path that leads out of the roots by the time
    the job runs (here: written past the API) fails with invalid_location and touches nothing."""
    outside = tmp_path / "outside-the-roots"
    spec = {
        "base": str(service_pair.base),
        "finetuned": str(service_pair.finetuned),
        "output": str(outside),
    }
    job_id = jobs.submit(spec, enqueue=False)
    jobs.enqueue(job_id)
    record = jobs.wait(job_id)
    assert record.status == "failed" and record.error.code == "invalid_location", record.error
    assert "output" in record.error.message
    assert not outside.exists()


def test_worker_processes_warm_up_the_fused_kernels_at_start(jobs):
    """Each pool process builds the numba kernels in the background when it starts, so the
    first job does not wait for the compile (FAPM_WARMUP_KERNELS, on by default)."""
    log = jobs.stack.workdir / "worker.log"
    deadline = time.monotonic() + 120
    while "fused CPU kernels ready" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    assert "kernel warm-up failed" not in log.read_text()
