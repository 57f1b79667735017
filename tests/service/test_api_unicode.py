"""Text that is not valid Unicode, over real HTTP (uvicorn, redis-server).

A lone UTF-16 surrogate (`"\\ud800"` as a JSON escape, or its raw UTF-8 bytes) anywhere in a body
is a 422 at submission on every route that takes a body, and nothing is stored. A record that was
stored with one anyway (before the check), or whose spec fails a rule added since, still lists,
reads and cancels; a worker fails such a spec with `invalid_spec` instead of running it.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from app.jobs.store import JobStore, new_job_id
from tests.service.conftest import API_KEYS, HF_WEBHOOK_SECRET, client
from tests.service.test_api_jobs import assert_problem
from tests.service.test_worker_jobs import Jobs

LONE = "\\ud800"  # as it appears in the JSON text: a backslash escape, not a character


@pytest.fixture(scope="module")
def store(api_stack) -> JobStore:
    return JobStore.from_url(api_stack.redis_url)


@pytest.fixture(autouse=True)
def _release_quota(store):
    yield
    for tenant in API_KEYS:
        for job_id in store.redis.smembers(f"fapm:tenant:{tenant}:active"):
            store.finish(job_id, "cancelled")


def _job_body(local_root, **extra) -> dict:
    return {
        "base": str(local_root / "models" / "base"),
        "finetuned": str(local_root / "models" / "sft"),
        "output": str(local_root / "out" / uuid.uuid4().hex),
        **extra,
    }


def _eval_body(local_root, **extra) -> dict:
    return {
        "base": str(local_root / "models" / "base"),
        "model": str(local_root / "models" / "sft"),
        "evaluate": {
            "task": str(local_root / "eval" / "task.jsonl"),
            "general": str(local_root / "eval" / "general.jsonl"),
        },
        **extra,
    }


def _with_lone_surrogate(body: dict, marker: str) -> bytes:
    """The body as JSON text with `marker` (a string somewhere in it) turned into `\\ud800`."""
    text = json.dumps(body)
    assert marker in text
    return text.replace(marker, LONE).encode()


def _job_count(store: JobStore, tenant: str = "alice") -> int:
    return store.redis.zcard(f"fapm:tenant:{tenant}:jobs")


# Where a lone surrogate may hide, and the field the 422 names.
JOB_CASES = [
    ("label value", {"labels": {"team": "MARK"}}, "labels.team"),
    ("label key", {"labels": {"MARK": "x"}}, "labels"),
    ("output uri", {"output": "/MARK"}, "output"),
    ("webhook secret", {"webhook": {"url": "http://127.0.0.1:9/h", "secret": "MARK"}}, None),
    ("webhook url", {"webhook": {"url": "http://127.0.0.1:9/h?t=MARK"}}, "webhook.url"),
    ("unknown field", {"zzz": ["ok", {"deep": "MARK"}]}, "zzz.1.deep"),
]


@pytest.mark.parametrize(("case", "extra", "field"), JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_lone_surrogate_in_a_job_body_is_422_and_stores_nothing(
    api_stack, store, local_root, case, extra, field
):
    body = _job_body(local_root, **extra)
    if case == "output uri":
        body["output"] = str(local_root / "out" / "MARK")
    before = _job_count(store)
    with client(api_stack) as http:
        response = http.post(
            "/v1/jobs",
            content=_with_lone_surrogate(body, "MARK"),
            headers={"content-type": "application/json"},
        )
        problem = assert_problem(response, 422, "validation_error")
        (error,) = problem["errors"]
        assert error["type"] == "invalid_unicode"
        assert "surrogate" in error["message"]
        if field is not None:
            assert error["field"] == field
        else:
            assert error["field"] == "webhook.secret"
        assert _job_count(store) == before
        assert http.get("/v1/jobs").status_code == 200


def test_lone_surrogate_in_an_evaluation_path_is_422(api_stack, store, local_root):
    body = _eval_body(local_root)
    body["evaluate"]["task"] = str(local_root / "eval" / "MARK.jsonl")
    before = _job_count(store)
    with client(api_stack) as http:
        response = http.post(
            "/v1/evaluations",
            content=_with_lone_surrogate(body, "MARK"),
            headers={"content-type": "application/json"},
        )
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["field"] == "evaluate.task"
    assert problem["errors"][0]["type"] == "invalid_unicode"
    assert _job_count(store) == before


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xed\xa0\x80", "not UTF-8"),  # U+D800 encoded as UTF-8: not valid UTF-8
        (b"\xff", "not UTF-8"),
        (b"\\udc00", "surrogate"),  # a lone trailing surrogate
        (b"\\ude00\\ud83d", "surrogate"),  # a pair in the wrong order
    ],
)
def test_undecodable_text_is_422_without_content_type(api_stack, store, local_root, raw, reason):
    body = json.dumps(_job_body(local_root, labels={"a": "MARK"})).encode()
    before = _job_count(store)
    with client(api_stack) as http:
        # No content-type: FastAPI still reads the body as JSON, and so does the check.
        response = http.post("/v1/jobs", content=body.replace(b"MARK", raw))
    problem = assert_problem(response, 422, "validation_error")
    assert reason in json.dumps(problem)
    assert _job_count(store) == before


def test_valid_astral_text_is_accepted_and_reads_back(api_stack, local_root):
    body = _job_body(local_root)
    text = json.dumps(body)[:-1] + ', "labels": {"emoji": "\\ud83d\\ude00 ok"}}'
    with client(api_stack) as http:
        response = http.post(
            "/v1/jobs", content=text.encode(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert http.get(f"/v1/jobs/{job_id}").json()["labels"] == {"emoji": "\U0001f600 ok"}


def test_hub_webhook_checks_the_secret_before_the_body(api_stack):
    garbage = b'{"event": {"action": "' + LONE.encode() + b'"'  # not even JSON
    url = f"{api_stack.api_url}/v1/hooks/huggingface"
    with client(api_stack, tenant=None) as http:
        for headers in ({}, {"X-Webhook-Secret": "wrong"}):
            response = http.post(url, content=garbage, headers=headers)
            assert_problem(response, 401, "unauthorized")
        payload = {
            "event": {"action": "update", "scope": "repo.content"},
            "repo": {"name": "acme/MARK", "type": "model"},
        }
        response = http.post(
            url,
            content=_with_lone_surrogate(payload, "MARK"),
            headers={"X-Webhook-Secret": HF_WEBHOOK_SECRET, "content-type": "application/json"},
        )
        problem = assert_problem(response, 422, "validation_error")
        assert problem["errors"][0]["field"] == "repo.name"


def test_every_route_with_a_body_decodes_it_strictly():
    from app.api.strict_json import StrictJSONRoute
    from app.main import create_app

    app = create_app()
    included = [getattr(r, "original_router", r) for r in app.routes]
    every = [route for r in included for route in getattr(r, "routes", [r])]
    routes = [r for r in every if getattr(r, "body_field", None) is not None]
    assert {r.path for r in routes} >= {"/v1/jobs", "/v1/evaluations", "/v1/hooks/huggingface"}
    assert all(isinstance(r, StrictJSONRoute) for r in routes), [r.path for r in routes]


# -- records stored before the check (or before a rule was tightened) still read -------------


def _store_job(store: JobStore, spec: dict, labels: dict, kind: str = "prune") -> str:
    job_id = new_job_id()
    outcome = store.create(
        job_id=job_id,
        tenant="alice",
        queue="cpu",
        spec_json=spec,
        labels=labels,
        webhook_url="https://hooks.example/fapm?token=s3cr3t",
        webhook_secret=None,
        max_active=1000,
        kind=kind,
    )
    assert outcome.kind == "created"
    store.mark_enqueued(job_id)
    return job_id


def test_a_stored_lone_surrogate_still_lists_reads_and_cancels(api_stack, store, local_root):
    spec = _job_body(local_root)
    spec["output"] += "\ud800"
    job_id = _store_job(store, spec, {"team": "\ud800", "\udc00key": "v"})
    with client(api_stack) as http:
        listed = http.get("/v1/jobs", params={"limit": 200})
        assert listed.status_code == 200, listed.text
        (record,) = [job for job in listed.json()["jobs"] if job["id"] == job_id]
        assert record["labels"] == {"team": "\ufffd", "\ufffdkey": "v"}
        assert record["spec"]["output"].endswith("\ufffd")
        got = http.get(f"/v1/jobs/{job_id}")
        assert got.status_code == 200, got.text
        assert got.json()["labels"] == record["labels"]
        cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 202, cancelled.text
        assert cancelled.json()["status"] == "cancelled"


def test_a_stored_spec_that_fails_todays_rules_still_reads(api_stack, store, local_root):
    spec = _job_body(local_root, sparsity=7, method="no-such-method")
    job_id = _store_job(store, spec, {})
    with client(api_stack) as http:
        listed = http.get("/v1/jobs", params={"limit": 200})
        assert listed.status_code == 200, listed.text
        assert job_id in [job["id"] for job in listed.json()["jobs"]]
        got = http.get(f"/v1/jobs/{job_id}")
        assert got.status_code == 200, got.text
        assert got.json()["spec"]["sparsity"] == 7  # shown as stored
        assert got.json()["spec"]["method"] == "no-such-method"
        assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202


@pytest.mark.slow
def test_worker_fails_a_stored_invalid_spec_with_invalid_spec(service, local_root):
    jobs = Jobs(service)
    store = jobs.store
    job_id = _store_job(store, _job_body(local_root, sparsity=7), {})
    jobs.enqueue(job_id)
    deadline = time.monotonic() + 60
    while store.get(job_id).status in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    record = store.get(job_id)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "invalid_spec"
    assert "sparsity" in record.error.message


def test_a_cursor_whose_job_expired_continues_the_list(api_stack, store, local_root):
    # A finished job's record expires and listing drops its index entry: a client paging with
    # that job's id as cursor still gets the jobs created before it (ids sort by time).
    with client(api_stack, tenant="bob") as http:
        ids = [http.post("/v1/jobs", json=_job_body(local_root)).json()["id"] for _ in range(3)]
        first = http.get("/v1/jobs", params={"limit": 1}).json()
        assert [job["id"] for job in first["jobs"]] == [ids[2]]
        store.redis.delete(f"fapm:job:{ids[2]}")  # as if it expired
        store.redis.zrem("fapm:tenant:bob:jobs", ids[2])
        rest = http.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]})
        assert rest.status_code == 200, rest.text
        assert [job["id"] for job in rest.json()["jobs"]] == [ids[1], ids[0]]


@pytest.mark.parametrize("word", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_not_json(api_stack, store, local_root, word):
    """Python's json reads NaN and Infinity; RFC 8259 does not, and neither does the API."""
    body = json.dumps(_job_body(local_root, alpha=123.5)).encode()
    before = _job_count(store)
    with client(api_stack) as http:
        response = http.post("/v1/jobs", content=body.replace(b"123.5", word.encode()))
    problem = assert_problem(response, 422, "validation_error")
    assert f"{word} is not JSON" in json.dumps(problem)
    assert _job_count(store) == before
