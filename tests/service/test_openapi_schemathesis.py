"""schemathesis against the real API (uvicorn + redis-server, `api_stack`) with every check, a
fixed seed and deterministic generation: the OpenAPI document states what the API enforces, and
the API answers only what the document declares. Zero failures.

What the run needs from its surroundings, and why (none of it switches a check off):

* A worker heartbeat, written here every second: without a worker, /readyz answers its documented
  503, which `not_a_server_error` counts as a failure.
* Jobs end: a thread here cancels the tenant's active jobs every 0.1 s, as a worker would end
  them. Event streams of ended jobs replay and close (a queued job's stream stays open by
  design), and the tenant's quota frees up (a 429 is documented and accepted either way).
* The Hub secret header, so the Hub route's body is exercised, not only its 401.
* `positive_data_acceptance` lets the submission routes answer 422 to a schema-valid body only
  for rules JSON Schema cannot state (tests/service/schemathesis_checks.py keeps that narrow).

The equivalence of the documented Idempotency-Key pattern with the server's own check is proven
separately (the 400 is the API's, so FastAPI does not enforce the pattern itself).
"""

from __future__ import annotations

import os
import random
import re
import string
import subprocess
import threading
import time
from pathlib import Path

import pytest

from app.api.deps import IDEMPOTENCY_KEY_PATTERN
from app.api.submission import normalize_idempotency_key
from app.core.problems import ProblemError
from app.jobs.store import JobStore
from tests.service.conftest import API_KEYS, HF_WEBHOOK_SECRET
from worker.spec import NOT_BLANK, JobSpec

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261001
MAX_EXAMPLES = 110  # per operation and phase; about 2,000 cases in all
FAKE_WORKER = "schemathesis-fake@localhost"

CONFIG = """
seed = {seed}
workers = 1
hooks = "tests.service.schemathesis_checks"
max-stream-events = 20
request-timeout = 10
suppress-health-check = ["filter_too_much", "too_slow"]

[generation]
deterministic = true
max-examples = {max_examples}
database = "none"

[checks]
enabled = true

[[operations]]
include-name-regex = "^POST /v1/(jobs|evaluations|hooks/huggingface|hooks/mlflow)$"
checks.positive_data_acceptance.expected-statuses = [
  "2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"
]
"""


class FakeWorker(threading.Thread):
    """Keeps a worker heartbeat fresh and ends the tenant's active jobs, as a worker would."""

    def __init__(self, store: JobStore, tenant: str) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.tenant = tenant
        self.stopped = threading.Event()

    def run(self) -> None:
        beat = 0.0
        while not self.stopped.wait(0.1):
            if time.monotonic() - beat > 1:
                self.store.heartbeat(FAKE_WORKER, ["cpu", "gpu"], False, 5)
                beat = time.monotonic()
            for job_id in self.store.redis.smembers(f"fapm:tenant:{self.tenant}:active"):
                self.store.finish(job_id, "cancelled")

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)
        self.store.forget_worker(FAKE_WORKER)


@pytest.mark.slow
def test_schemathesis_all_checks_find_nothing(api_stack, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(seed=SEED, max_examples=MAX_EXAMPLES))
    argv = [
        str(Path(os.sys.executable).parent / "st"),
        "--config-file",
        str(config),
        "run",
        f"{api_stack.api_url}/openapi.json",
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {API_KEYS['alice']}",
        "--header",
        f"X-Webhook-Secret: {HF_WEBHOOK_SECRET}",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCHEMATHESIS_TELEMETRY": "false"}
    worker = FakeWorker(JobStore.from_url(api_stack.redis_url), "alice")
    worker.start()
    started = time.monotonic()
    try:
        run = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        worker.stop()
    seconds = time.monotonic() - started
    output = run.stdout + run.stderr
    cases = re.search(r"(\d+) generated", output)
    print(output[-1500:], f"\n{seconds:.0f} s")
    assert run.returncode == 0, output[-12000:]
    assert cases is not None and int(cases.group(1)) >= 1500, output[-3000:]
    assert re.search(r"(\d+) generated, \1 passed", output), output[-3000:]  # every case passed


def test_documented_idempotency_key_pattern_is_the_servers_rule():
    pattern = re.compile(IDEMPOTENCY_KEY_PATTERN)
    rng = random.Random(SEED)
    alphabet = string.printable + '""""' + "\x7f\x80é"
    samples = [
        '""',
        '"',
        '"""',
        '"a',
        'a"',
        '"a"',
        "a b",
        "x" * 255,
        "x" * 256,
        '"' + "x" * 255 + '"',
    ]
    samples += [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(5000)
    ]
    for raw in samples:
        try:
            normalize_idempotency_key(raw)
            accepted = True
        except ProblemError:
            accepted = False
        if raw != raw.strip():
            continue  # servers strip header whitespace before the app sees it
        assert accepted == bool(pattern.fullmatch(raw)), repr(raw)


def test_documented_not_blank_pattern_is_the_specs_rule():
    # JobSpec/EvaluationSpec refuse a location that str.strip() empties; the document's pattern
    # says the same for every code point (JSON Schema's `\S` would not: "\x1f").
    pattern = re.compile(NOT_BLANK)
    disagree = [
        hex(code)
        for code in range(0x110000)
        if (chr(code).strip() == "") != (pattern.search(chr(code)) is None)
    ]
    assert disagree == []
    schema = JobSpec.model_json_schema()["properties"]
    assert schema["output"]["pattern"] == NOT_BLANK and schema["output"]["minLength"] == 1
