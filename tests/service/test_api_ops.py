"""Probes, metrics and the OpenAPI document, over real HTTP against real Redis."""

from __future__ import annotations

import re

import pytest

from app.api import examples
from app.jobs.records import JobRecord, JobRequest, WebhookEvent
from app.jobs.store import JobStore
from tests.service.conftest import client


@pytest.fixture
def bare_stack(make_stack):
    """A private Redis + API: readiness and metrics depend on what is in Redis."""
    stack = make_stack()
    stack.start_redis()
    stack.start_api()
    return stack


def metric(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(f"{name}{{{label_text}}}" if labels else name) + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name} {labels} not in metrics:\n{text}"
    return float(match.group(1))


def test_healthz_needs_no_auth(api_stack):
    with client(api_stack, tenant=None) as http:
        response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_needs_a_fresh_worker_heartbeat(bare_stack):
    store = JobStore.from_url(bare_stack.redis_url)
    with client(bare_stack, tenant=None) as http:
        down = http.get("/readyz")
        assert down.status_code == 503
        assert down.headers["content-type"].startswith("application/problem+json")
        assert down.json()["code"] == "not_ready"
        assert "heartbeat" in down.json()["detail"]

        store.heartbeat("w1@host", ["cpu"], gpu=False, ttl=30)
        up = http.get("/readyz")
        assert up.status_code == 200, up.text
        assert up.json()["workers"]["w1@host"]["queues"] == ["cpu"]

        # Older than FAPM_HEARTBEAT_FRESH_SECONDS (5 s in the tests): not ready again.
        store.redis.zadd("fapm:workers", {"w1@host": 1.0})
        assert http.get("/readyz").status_code == 503


def test_readyz_503_when_redis_is_gone(make_stack):
    stack = make_stack()
    stack.start_redis()
    stack.start_api()
    redis_process = stack.processes[0]
    assert redis_process.name == "redis"
    redis_process.stop()
    with client(stack, tenant=None) as http:
        response = http.get("/readyz")
        assert response.status_code == 503
        assert response.json()["code"] == "not_ready"
        # Other routes: 503 problem too, never a 500.
        jobs = http.get("/v1/jobs", headers={"X-API-Key": "alice-key-0123456789"})
        assert jobs.status_code == 503, jobs.text
        assert jobs.json()["code"] == "store_unavailable"
        assert jobs.headers["retry-after"]


def test_metrics_report_jobs_durations_bytes_and_queues(bare_stack, local_root):
    store = JobStore.from_url(bare_stack.redis_url)
    body = {
        "base": str(local_root / "b"),
        "finetuned": str(local_root / "f"),
        "output": str(local_root / "o"),
    }
    with client(bare_stack) as http:
        ids = [http.post("/v1/jobs", json=body).json()["id"] for _ in range(3)]
        gpu_job = http.post("/v1/jobs", json={**body, "device": "cuda"}).json()["id"]
        lease = store.start(ids[0], lease_seconds=30)
        assert not isinstance(lease, str)
        store.finish(ids[0], "succeeded", lease=lease)
        store.observe_duration(3.0, 1000)
        store.observe_duration(120.0, 500)
        http.post(f"/v1/jobs/{ids[1]}/cancel")
        store.heartbeat("w@h", ["cpu", "gpu"], gpu=True, ttl=30)

        response = http.get("/metrics", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "fapm_jobs", state="queued") == 2  # ids[2] and gpu_job
    assert metric(text, "fapm_jobs", state="running") == 0
    # Finished jobs expire from the store: they are counted, not gauged.
    assert 'fapm_jobs{state="succeeded"}' not in text
    assert 'fapm_jobs{state="cancelled"}' not in text
    assert metric(text, "fapm_jobs_finished_total", status="succeeded") == 1
    assert metric(text, "fapm_jobs_finished_total", status="cancelled") == 1
    assert metric(text, "fapm_job_duration_seconds_bucket", le="1.0") == 0
    assert metric(text, "fapm_job_duration_seconds_bucket", le="5.0") == 1
    assert metric(text, "fapm_job_duration_seconds_bucket", le="300.0") == 2
    assert metric(text, "fapm_job_duration_seconds_bucket", le="+Inf") == 2
    assert metric(text, "fapm_job_duration_seconds_count") == 2
    assert metric(text, "fapm_job_duration_seconds_sum") == 123.0
    assert metric(text, "fapm_bytes_processed_total") == 1500
    # Celery messages wait in the lists named after the queues (no worker consumes them here).
    assert metric(text, "fapm_queue_depth", queue="cpu") == 3
    assert metric(text, "fapm_queue_depth", queue="gpu") == 1
    assert metric(text, "fapm_workers", queue="gpu") == 1
    assert "# TYPE fapm_job_duration_seconds histogram" in text
    assert gpu_job


def test_openapi_document_is_complete(api_stack):
    with client(api_stack, tenant=None) as http:
        doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    schemes = doc["components"]["securitySchemes"]
    assert schemes["BearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["BearerAuth"]["description"],
    }
    assert schemes["ApiKeyHeader"]["in"] == "header"
    assert schemes["ApiKeyHeader"]["name"] == "X-API-Key"

    paths = doc["paths"]
    for path, item in paths.items():
        for method, operation in item.items():
            secured = path.startswith(("/v1/jobs", "/v1/evaluations"))
            assert bool(operation.get("security")) == secured, (method, path)
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert list(response["content"]) == ["application/problem+json"], (
                        method,
                        path,
                        status,
                    )
                    assert response["content"]["application/problem+json"]["schema"] == {
                        "$ref": "#/components/schemas/Problem"
                    }
    post = paths["/v1/jobs"]["post"]
    assert {"401", "409", "422", "429", "503"} <= set(post["responses"])
    assert set(post["requestBody"]["content"]["application/json"]["examples"]) == set(
        examples.JOB_REQUEST_EXAMPLES
    )
    assert "Location" in post["responses"]["202"]["headers"]
    assert "Idempotency-Key" in {p["name"] for p in post["parameters"]}
    events = paths["/v1/jobs/{job_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]

    hooks = doc["webhooks"]
    assert set(hooks) == {"job.succeeded", "job.failed", "job.cancelled"}
    for hook in hooks.values():
        body = hook["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": "#/components/schemas/WebhookEvent"}
        headers = {p["name"] for p in hook["post"]["parameters"] if p["in"] == "header"}
        assert headers == {"webhook-id", "webhook-timestamp", "webhook-signature"}
        assert "HMAC-SHA256" in hook["post"]["description"]


def test_openapi_examples_match_the_models():
    for example in examples.JOB_REQUEST_EXAMPLES.values():
        JobRequest.model_validate(example["value"])
    for record in (
        examples.QUEUED_RECORD,
        examples.RUNNING_RECORD,
        examples.SUCCEEDED_RECORD,
        examples.FAILED_RECORD,
        examples.CANCELLED_RECORD,
    ):
        JobRecord.model_validate(record)
    WebhookEvent.model_validate(
        {
            "type": "job.succeeded",
            "timestamp": "2026-10-01T12:00:00Z",
            "data": examples.SUCCEEDED_RECORD,
        }
    )
