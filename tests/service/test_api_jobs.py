"""REST API v1 over real HTTP (uvicorn) against a real redis-server, with no worker running:
submission, auth, validation as problem+json, location and webhook guards, idempotency, quota,
tenant isolation, listing, cancel and report. Jobs are moved through their states with the
JobStore, exactly as a worker would move them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from app.api.submission import Submitter, fingerprint
from app.core.config import Settings
from app.core.problems import ProblemError
from app.jobs.records import JobRecord, JobRequest
from app.jobs.routing import QueueRouter
from app.jobs.store import JobStore, new_job_id
from tests.service.conftest import API_KEYS, client

REPO = Path(__file__).resolve().parents[2]
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance", "code"}


@pytest.fixture(scope="module")
def store(api_stack) -> JobStore:
    return JobStore.from_url(api_stack.redis_url)


@pytest.fixture(autouse=True)
def _release_quota(store):
    """Tests share one Redis and the jobs never run: end every active job after each test so
    the per-tenant quota stays free for the next one."""
    yield
    for tenant in API_KEYS:
        for job_id in store.redis.smembers(f"fapm:tenant:{tenant}:active"):
            store.finish(job_id, "cancelled")


@pytest.fixture
def body(local_root) -> dict:
    return {
        "base": str(local_root / "models" / "base"),
        "finetuned": f"file://{local_root}/models/sft",
        "output": str(local_root / "out" / uuid.uuid4().hex),
        "sparsity": 0.8,
        "labels": {"test": "api"},
    }


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert PROBLEM_KEYS <= problem.keys(), problem
    assert problem["status"] == status
    assert problem["code"] == code, problem
    assert problem["title"]
    return problem


# -- submission --------------------------------------------------------------------------------


def test_submit_answers_202_with_record_and_location(api_stack, body, store):
    with client(api_stack) as http:
        response = http.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        record = JobRecord.model_validate(response.json())
        assert response.headers["location"] == f"/v1/jobs/{record.id}"
        assert record.status == "queued"
        assert record.queue == "cpu"  # device auto and no GPU worker alive
        assert record.spec.sparsity == 0.8
        assert record.labels == {"test": "api"}
        # Written before it was enqueued, and marked enqueued afterwards.
        assert store.get(record.id, "alice") == record
        assert store.is_enqueued(record.id)
        # The Celery message sits in the `cpu` list (no worker consumes it here).
        assert any(record.id in msg for msg in store.redis.lrange("cpu", 0, -1))
        # The Location answers.
        again = http.get(response.headers["location"])
        assert again.status_code == 200
        assert again.json()["id"] == record.id


def test_device_picks_the_queue(api_stack, body):
    with client(api_stack) as http:
        assert http.post("/v1/jobs", json={**body, "device": "cuda"}).json()["queue"] == "gpu"
        assert http.post("/v1/jobs", json={**body, "device": "cpu"}).json()["queue"] == "cpu"


def test_auto_device_goes_to_gpu_while_a_gpu_worker_is_alive(make_stack, local_root):
    stack = make_stack(FAPM_QUEUE_ROUTE_CACHE_SECONDS="0")
    stack.start_redis()
    stack.start_api()
    store = JobStore.from_url(stack.redis_url)
    body = {
        "base": str(local_root / "b"),
        "finetuned": str(local_root / "f"),
        "output": str(local_root / "o"),
    }
    with client(stack) as http:
        store.heartbeat("cpu-worker@host", ["cpu"], gpu=False, ttl=30)
        assert http.post("/v1/jobs", json=body).json()["queue"] == "cpu"
        store.heartbeat("gpu-worker@host", ["cpu", "gpu"], gpu=True, ttl=30)
        assert http.post("/v1/jobs", json=body).json()["queue"] == "gpu"
        # The GPU worker's heartbeat goes stale (older than FAPM_HEARTBEAT_FRESH_SECONDS=5).
        store.redis.zadd("fapm:workers", {"gpu-worker@host": 1.0})
        assert http.post("/v1/jobs", json=body).json()["queue"] == "cpu"


def test_import_app_main_imports_no_torch():
    code = (
        "import sys, app.main\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', "
        "'worker.tasks', 'worker.engine'))]\n"
        "assert not bad, bad\n"
        "assert app.main.app.title == 'fapm-service'\n"
    )
    env = {**os.environ, "FAPM_API_KEYS": "t:k"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


# -- auth --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {API_KEYS['alice']}"},
        {"X-API-Key": "alice"},
        {"Authorization": "Bearer"},
    ],
    ids=["none", "wrong-bearer", "basic-scheme", "wrong-x-api-key", "empty"],
)
def test_v1_routes_need_a_valid_key(api_stack, body, headers):
    with client(api_stack, tenant=None) as http:
        for method, path in [
            ("POST", "/v1/jobs"),
            ("GET", "/v1/jobs"),
            ("GET", "/v1/jobs/0123abcd"),
            ("POST", "/v1/jobs/0123abcd/cancel"),
            ("GET", "/v1/jobs/0123abcd/report"),
            ("GET", "/v1/jobs/0123abcd/events"),
        ]:
            response = http.request(method, path, json=body, headers=headers)
            problem = assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert API_KEYS["alice"] not in response.text
            assert problem["instance"] == path


def test_x_api_key_header_works(api_stack, body):
    with client(api_stack, tenant=None) as http:
        response = http.post("/v1/jobs", json=body, headers={"X-API-Key": API_KEYS["bob"]})
        assert response.status_code == 202
        assert http.get("/v1/jobs", headers={"X-API-Key": API_KEYS["bob"]}).status_code == 200


def test_keys_file_holds_only_hashes(make_stack, tmp_path, local_root):
    import hashlib

    keys = tmp_path / "keys.txt"
    digest = hashlib.sha256(b"file-key-1").hexdigest()
    keys.write_text(f"# tenant:sha256(key)\ncarol:{digest}\n")
    stack = make_stack(FAPM_API_KEYS="", FAPM_API_KEYS_FILE=str(keys))
    stack.start_redis()
    stack.start_api()
    with client(stack, tenant=None) as http:
        ok = http.get("/v1/jobs", headers={"Authorization": "Bearer file-key-1"})
        assert ok.status_code == 200, ok.text
        # The digest itself is not a key.
        assert http.get("/v1/jobs", headers={"X-API-Key": digest}).status_code == 401
        # A key added to the file works without a restart (the table follows the file).
        keys.write_text(f"carol:{digest}\ndave:{hashlib.sha256(b'file-key-2').hexdigest()}\n")
        later = http.get("/v1/jobs", headers={"Authorization": "Bearer file-key-2"})
        assert later.status_code == 200, later.text


# -- validation: always problem+json, never a 500 ------------------------------------------------


def test_validation_problem_names_each_field(api_stack, body):
    with client(api_stack) as http:
        response = http.post(
            "/v1/jobs",
            json={**body, "sparsity": 1.5, "method": "nope", "surprise": 1},
        )
    problem = assert_problem(response, 422, "validation_error")
    assert problem["type"] == "/problems/validation-error"
    assert problem["instance"] == "/v1/jobs"
    fields = {e["field"]: e for e in problem["errors"]}
    assert set(fields) == {"sparsity", "method", "surprise"}
    assert fields["surprise"]["type"] == "extra_forbidden"
    assert all(e["location"] == "body" for e in problem["errors"])
    assert "sparsity" in problem["detail"]


def test_model_validator_errors_name_their_field(api_stack, body):
    both = {**body, "adapter": body["finetuned"]}
    with client(api_stack) as http:
        problem = assert_problem(http.post("/v1/jobs", json=both), 422, "validation_error")
    assert [e["field"] for e in problem["errors"]] == ["finetuned"]
    assert "exactly one" in problem["errors"][0]["message"]


BAD_BODIES = [
    b"",
    b"not json",
    b"{",
    b"[]",
    b"null",
    b'"a string"',
    b'{"base": 1, "output": 2, "finetuned": 3}',
    b'{"base": "/x", "output": "/y"}',
    b'{"base": "", "output": "/y", "finetuned": "/z"}',
    b'{"base": "/x", "output": "/y", "finetuned": "/z", "exclude": "("}',
    b'{"base": "/x", "output": "/y", "finetuned": "/z", "shard_size": "5XB"}',
    b'{"base": "/x", "output": "/y", "finetuned": "/z", "shard_size": -1}',
    b'{"base": "/x", "output": "/y", "finetuned": "/z", "method": "dare", "scope": "model"}',
    b'{"base": "/x", "output": "/y", "finetuned": "/z", "sparsity": "NaN"}',
    b'{"base": "/x", "output": "/y", "finetuned": "/z", "labels": {"a": 1}}',
    b'{"base": "/x", "output": "/y", "finetuned": "/z", "labels": []}',
    b'{"base": "/x", "output": "/y", "finetuned": "/z", "webhook": {"url": "not a url"}}',
    b'{"base": "/x", "output": "/y", "finetuned": "/z", "webhook": {"url": "ftp://h/"}}',
    b'{"base": "/x", "output": "/y", "finetuned": "/z", "webhook": {"url": "https://h/", "x": 1}}',
    b'{"base": "\\u0000", "output": "/y", "finetuned": "/z"}',
    b'{"base": "/x", "output": "/y", "finetuned": "/z", "seed": 1e400}',
    '{"base": "/ä/\U0001f600", "output": "/y", "finetuned": "/z"}'.encode(),
    b"\xff\xfe\x00garbage",
]


@pytest.mark.parametrize("raw", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_bodies_are_4xx_problems(api_stack, raw):
    with client(api_stack) as http:
        response = http.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert PROBLEM_KEYS <= response.json().keys()


def test_many_labels_refused(api_stack, body):
    with client(api_stack) as http:
        labels = {f"k{i}": "v" for i in range(33)}
        problem = assert_problem(
            http.post("/v1/jobs", json={**body, "labels": labels}), 422, "validation_error"
        )
    assert problem["errors"][0]["field"] == "labels"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/jobs?limit=0", 422, "validation_error"),
        ("GET", "/v1/jobs?limit=abc", 422, "validation_error"),
        ("GET", "/v1/jobs?status=bogus", 422, "validation_error"),
        ("GET", "/v1/jobs?label=novalue", 422, "validation_error"),
        ("GET", "/v1/jobs?cursor=not-a-job-id", 422, "validation_error"),
        ("GET", "/v1/nothing-here", 404, "not_found"),
        ("DELETE", "/v1/jobs", 405, "method_not_allowed"),
        ("GET", "/v1/jobs/../../etc/passwd", 404, "not_found"),
        ("GET", "/v1/jobs/NOT-HEX", 404, "job_not_found"),
        ("GET", "/v1/jobs/" + "a" * 300, 404, "job_not_found"),
    ],
)
def test_bad_requests_are_problems(api_stack, method, path, status, code):
    with client(api_stack) as http:
        problem = assert_problem(http.request(method, path), status, code)
    if status == 422 and code == "validation_error":
        assert problem["errors"][0]["location"] == "query"


def test_oversized_body_is_413(api_stack, body):
    with client(api_stack) as http:
        huge = {**body, "labels": {"x": "y" * (2 << 20)}}
        assert_problem(http.post("/v1/jobs", json=huge), 413, "content_too_large")


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "tab\tkey", '""'])
def test_malformed_idempotency_key_is_400(api_stack, body, key):
    with client(api_stack) as http:
        response = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert_problem(response, 400, "invalid_idempotency_key")


# -- local paths and webhook URLs --------------------------------------------------------------


def test_local_paths_outside_the_roots_are_refused(api_stack, body, local_root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = local_root / f"link-{uuid.uuid4().hex}"
    link.symlink_to(outside, target_is_directory=True)
    cases = {
        "base": "/etc",
        "finetuned": f"{local_root}/../{local_root.name}-sibling/sft",  # `..` escape
        "output": f"file://{link}/out",  # symlink escape
    }
    with client(api_stack) as http:
        response = http.post("/v1/jobs", json={**body, **cases})
        problem = assert_problem(response, 422, "invalid_location")
        assert {e["field"] for e in problem["errors"]} == set(cases)
        for field, value in {
            "base": "relative/path",
            "output": "file://otherhost/x",
            "finetuned": "ftp://host/model",
        }.items():
            one = http.post("/v1/jobs", json={**body, field: value})
            assert [e["field"] for e in assert_problem(one, 422, "invalid_location")["errors"]] == [
                field
            ]
        # Inside the root (also through `..` that stays inside) is fine.
        inside = f"{local_root}/models/../models/sft"
        assert http.post("/v1/jobs", json={**body, "finetuned": inside}).status_code == 202
        # Remote schemes pass the local check (their sources are the worker's business).
        remote = {**body, "base": "hf://org/base@main", "output": "s3://bucket/out/"}
        assert http.post("/v1/jobs", json=remote).status_code == 202
        malformed = {**body, "base": "hf://not-a-repo"}
        assert_problem(http.post("/v1/jobs", json=malformed), 422, "invalid_location")


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",  # plain http to a host that is not allow-listed
        "https://169.254.169.254/latest/meta-data/",  # cloud metadata
        "https://metadata.google.internal/",
        "https://10.1.2.3/hook",
        "https://192.168.0.10/hook",
        "https://127.0.0.2/hook",  # loopback, not allow-listed
        "https://[::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",  # IPv4-mapped private
        "https://user:pass@hooks.example.com/",
        "https://0.0.0.0/hook",
    ],
)
def test_webhook_ssrf_refused(api_stack, body, url):
    with client(api_stack) as http:
        response = http.post("/v1/jobs", json={**body, "webhook": {"url": url}})
    problem = assert_problem(response, 422, "invalid_location")
    assert problem["errors"][0]["field"] == "webhook.url"


def test_allow_listed_webhook_host_and_secret_never_returned(api_stack, body, store):
    secret = "whsec_" + "A" * 40
    hook = {"url": "http://127.0.0.1:9/hook", "secret": secret}
    with client(api_stack) as http:
        response = http.post("/v1/jobs", json={**body, "webhook": hook})
        assert response.status_code == 202, response.text
        assert secret not in response.text
        record = response.json()
        assert record["webhook"] == {
            "url": "http://127.0.0.1:9/hook",
            "signed": True,
            "deliveries": [],
        }
        assert secret not in http.get(f"/v1/jobs/{record['id']}").text
    assert secret not in str(store.redis.hgetall(f"fapm:job:{record['id']}"))
    assert store.webhook_secret(record["id"]) == secret


# -- idempotency -------------------------------------------------------------------------------


def test_idempotency_same_body_same_job(api_stack, body, store):
    key = f'"{uuid.uuid4()}"'  # structured-field string form
    with client(api_stack) as http:
        first = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        second = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key.strip('"')})
        assert first.status_code == second.status_code == 202
        assert "idempotent-replayed" not in first.headers
        assert second.headers["idempotent-replayed"] == "true"
        assert second.json()["id"] == first.json()["id"]
        assert second.headers["location"] == first.headers["location"]
        # Defaults filled in are the same request: sparsity given or defaulted alike.
        explicit = {**body, "method": "fapm", "alpha": 1.0}
        third = http.post("/v1/jobs", json=explicit, headers={"Idempotency-Key": key})
        assert third.json()["id"] == first.json()["id"]
        # Only one job was created and enqueued.
        listed = http.get("/v1/jobs", params={"label": "test=api", "limit": 200}).json()["jobs"]
        assert [j["id"] for j in listed].count(first.json()["id"]) == 1
        messages = [m for m in store.redis.lrange("cpu", 0, -1) if first.json()["id"] in m]
        assert len(messages) == 1


def test_idempotency_other_body_is_422(api_stack, body):
    key = str(uuid.uuid4())
    with client(api_stack) as http:
        assert http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}).status_code == 202
        other = http.post(
            "/v1/jobs", json={**body, "sparsity": 0.5}, headers={"Idempotency-Key": key}
        )
        assert_problem(other, 422, "idempotency_key_reused")
        # Another webhook secret is another request too.
        hooked = {**body, "webhook": {"url": "http://127.0.0.1:9/", "secret": "s1"}}
        key2 = str(uuid.uuid4())
        assert (
            http.post("/v1/jobs", json=hooked, headers={"Idempotency-Key": key2}).status_code == 202
        )
        hooked["webhook"]["secret"] = "s2"
        resent = http.post("/v1/jobs", json=hooked, headers={"Idempotency-Key": key2})
        assert_problem(resent, 422, "idempotency_key_reused")


def test_idempotency_key_in_flight_is_409(api_stack, body, store):
    """The first request wrote its record but has not enqueued it yet."""
    key = str(uuid.uuid4())
    request = JobRequest.model_validate(body)
    job_id = new_job_id()
    outcome = store.create(
        job_id=job_id,
        tenant="alice",
        queue="cpu",
        spec_json=request.model_dump(mode="json", exclude={"webhook", "labels"}),
        labels=request.labels,
        webhook_url=None,
        webhook_secret=None,
        max_active=100,
        idempotency_key=key,
        fingerprint=fingerprint(request),
    )
    assert outcome.kind == "created"
    with client(api_stack) as http:
        response = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        assert_problem(response, 409, "idempotency_key_in_flight")
        assert response.headers["retry-after"]
        store.mark_enqueued(job_id)
        done = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        assert done.status_code == 202
        assert done.json()["id"] == job_id


def test_idempotency_keys_are_per_tenant(api_stack, body):
    key = str(uuid.uuid4())
    with client(api_stack, "alice") as alice, client(api_stack, "bob") as bob:
        a = alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}).json()
        b = bob.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}).json()
    assert a["id"] != b["id"]


def test_failed_enqueue_fails_the_job_and_frees_the_key(api_stack, body, local_root, store):
    """The record is written before the enqueue; if Celery refuses the task the job fails with
    enqueue_failed (503 to the client) and a retry with the same key creates a fresh job."""
    settings = Settings(redis_url=api_stack.redis_url, local_roots=[local_root])
    sent: list[tuple[str, str]] = []

    def broken(job_id: str, queue: str) -> None:
        raise ConnectionError("broker down")

    submitter = Submitter(store, QueueRouter(store, 5.0), settings, enqueue=broken)
    request = JobRequest.model_validate(body)
    key = str(uuid.uuid4())
    with pytest.raises(ProblemError) as refused:
        submitter.submit("alice", request, key)
    assert refused.value.status == 503
    assert refused.value.code == "enqueue_failed"
    failed = store.get(refused.value.extra["job_id"], "alice")
    assert failed is not None and failed.status == "failed"
    assert failed.error is not None and failed.error.code == "enqueue_failed"
    assert store.is_enqueued(failed.id)  # nothing left for the sweeper

    submitter.enqueue = lambda job_id, queue: sent.append((job_id, queue))
    retried = submitter.submit("alice", request, key)
    assert not retried.replayed
    assert retried.record.id != failed.id
    assert sent == [(retried.record.id, "cpu")]


# -- quota -------------------------------------------------------------------------------------


def test_quota_is_429_with_retry_after(make_stack, local_root):
    stack = make_stack(FAPM_MAX_ACTIVE_JOBS_PER_TENANT="2", FAPM_RETRY_AFTER_SECONDS="7")
    stack.start_redis()
    stack.start_api()
    store = JobStore.from_url(stack.redis_url)
    body = {
        "base": str(local_root / "b"),
        "finetuned": str(local_root / "f"),
        "output": str(local_root / "o"),
    }
    with client(stack, "alice") as alice, client(stack, "bob") as bob:
        keyed = {"Idempotency-Key": "quota-key"}
        ids = [alice.post("/v1/jobs", json=body, headers=keyed).json()["id"]]
        ids.append(alice.post("/v1/jobs", json=body).json()["id"])
        refused = alice.post("/v1/jobs", json=body)
        problem = assert_problem(refused, 429, "quota_exceeded")
        assert refused.headers["retry-after"] == "7"
        assert problem["limit"] == 2
        # Other tenants have their own quota.
        assert bob.post("/v1/jobs", json=body).status_code == 202
        # A replay of an existing key is not a new job, so it is not refused.
        replay = alice.post("/v1/jobs", json=body, headers=keyed)
        assert replay.status_code == 202
        assert replay.json()["id"] == ids[0]
        # Finishing or cancelling a job frees its slot.
        assert alice.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 202
        assert alice.post("/v1/jobs", json=body).status_code == 202
        store.finish(ids[1], "succeeded")
        assert alice.post("/v1/jobs", json=body).status_code == 202
        assert alice.post("/v1/jobs", json=body).status_code == 429


# -- reading, isolation, listing ---------------------------------------------------------------


def test_tenants_see_only_their_jobs(api_stack, body):
    with client(api_stack, "alice") as alice, client(api_stack, "bob") as bob:
        job = alice.post("/v1/jobs", json=body).json()
        for method, path in [
            ("GET", f"/v1/jobs/{job['id']}"),
            ("POST", f"/v1/jobs/{job['id']}/cancel"),
            ("GET", f"/v1/jobs/{job['id']}/report"),
            ("GET", f"/v1/jobs/{job['id']}/events"),
        ]:
            theirs = bob.request(method, path)
            assert_problem(theirs, 404, "job_not_found")
            unknown = bob.request(method, path.replace(job["id"], new_job_id()))
            assert unknown.json()["detail"].split()[0:2] == theirs.json()["detail"].split()[0:2]
        assert job["id"] not in {j["id"] for j in bob.get("/v1/jobs?limit=200").json()["jobs"]}
        assert alice.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"  # untouched


def test_list_filters_and_cursor_pages(api_stack, body, store):
    run = uuid.uuid4().hex
    with client(api_stack) as http:
        ids = [
            http.post("/v1/jobs", json={**body, "labels": {"run": run, "n": str(i)}}).json()["id"]
            for i in range(5)
        ]
        http.post("/v1/jobs", json={**body, "labels": {"run": "other"}})
        http.post(f"/v1/jobs/{ids[1]}/cancel")

        seen, cursor, pages = [], None, 0
        while True:
            params = {"label": f"run={run}", "limit": 2, **({"cursor": cursor} if cursor else {})}
            page = http.get("/v1/jobs", params=params)
            assert page.status_code == 200, page.text
            data = page.json()
            pages += 1
            assert len(data["jobs"]) <= 2
            seen += [j["id"] for j in data["jobs"]]
            cursor = data["next_cursor"]
            if cursor is None:
                break
        assert seen == list(reversed(ids))  # newest first, each once, nothing else
        assert pages == 3

        cancelled = http.get("/v1/jobs", params={"label": f"run={run}", "status": "cancelled"})
        assert [j["id"] for j in cancelled.json()["jobs"]] == [ids[1]]
        queued = http.get("/v1/jobs", params={"label": f"run={run}", "status": "queued"})
        assert [j["id"] for j in queued.json()["jobs"]] == [ids[4], ids[3], ids[2], ids[0]]
        nothing = http.get("/v1/jobs", params={"label": f"run={run}", "status": "running"})
        assert nothing.json() == {"jobs": [], "next_cursor": None}


# -- cancel and report -------------------------------------------------------------------------


def test_cancel_queued_job_never_starts(api_stack, body, store):
    with client(api_stack) as http:
        job = http.post("/v1/jobs", json=body).json()
        response = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 202
        record = response.json()
        assert record["status"] == "cancelled"
        assert record["error"]["code"] == "cancelled"
        assert record["finished_at"] is not None
        # When a worker picks the message up, the store tells it not to run the job.
        assert store.start(job["id"], lease_seconds=10) == "cancelled"
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
        assert http.get(f"/v1/jobs/{job['id']}").json()["attempts"] == 0
        # A second cancel: the job has ended.
        again = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert assert_problem(again, 409, "job_finished")["job_status"] == "cancelled"


def test_cancel_running_job_requests_a_stop(api_stack, body, store):
    with client(api_stack) as http:
        job = http.post("/v1/jobs", json=body).json()
        lease = store.start(job["id"], lease_seconds=10)
        assert not isinstance(lease, str)
        response = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 202
        assert response.json()["status"] == "running"
        assert response.json()["cancel_requested"] is True
        assert store.cancel_requested(job["id"])
        # Idempotent while it runs.
        assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        store.finish(job["id"], "cancelled", lease=lease)
        assert_problem(http.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_finished")


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_cancel_finished_job_is_409(api_stack, body, store, status):
    with client(api_stack) as http:
        job = http.post("/v1/jobs", json=body).json()
        store.finish(
            job["id"], status, error={"code": "x", "message": "y"} if status == "failed" else None
        )
        problem = assert_problem(http.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_finished")
        assert problem["job_status"] == status
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == status


def test_report_404_until_there_is_one(api_stack, body, store):
    with client(api_stack) as http:
        job = http.post("/v1/jobs", json=body).json()
        problem = assert_problem(http.get(f"/v1/jobs/{job['id']}/report"), 404, "report_not_ready")
        assert problem["job_status"] == "queued"
        report = {"totals": {"tensors": 3, "kept": 0.2}, "tensors": [{"name": "w", "kept": 5}]}
        lease = store.start(job["id"], lease_seconds=10)
        assert not isinstance(lease, str)
        store.finish(
            job["id"],
            "succeeded",
            lease=lease,
            result={"output": body["output"], "report": {"tensors": 3}},
            report=report,
        )
        response = http.get(f"/v1/jobs/{job['id']}/report")
        assert response.status_code == 200
        assert response.json() == report
        record = http.get(f"/v1/jobs/{job['id']}").json()
        assert record["status"] == "succeeded"
        assert record["result"] == {"output": body["output"], "report": {"tensors": 3}}


def test_oversized_chunked_body_is_413(api_stack, body):
    def chunks():
        yield b'{"base": "/x", "output": "/y", "finetuned": "/z", "labels": {"x": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}}'

    with client(api_stack) as http:
        response = http.post(
            "/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}
        )
    assert_problem(response, 413, "content_too_large")


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"", {}),
        (b"not json", {}),
        (b"[]", {}),
        (b"null", {}),
        (b'{"base": 1, "output": []}', {}),
        (b'{"base": "/x", "finetuned": "/y", "output": "/z", "sparsity": "lots"}', {}),
        (b'{"base": "ftp://x/", "finetuned": "s3://", "output": "hf://only-a-name"}', {}),
        (b'{"base": "/x", "finetuned": "/y", "output": "/z", "webhook": {"url": "no"}}', {}),
        (b'{"base": "\\u0000", "finetuned": "/y", "output": "/z", "shard_size": "9ZB"}', {}),
        (b"{" * 5000, {}),
        (b'{"base": "/x", "finetuned": "/y", "output": "/z"}', {"Idempotency-Key": ""}),
        (b'{"base": "/x", "finetuned": "/y", "output": "/z"}', {"Content-Type": "text/plain"}),
    ],
)
def test_malformed_submissions_get_a_problem_not_a_500(api_stack, content, headers):
    with client(api_stack) as http:
        response = http.post(
            "/v1/jobs", content=content, headers={"Content-Type": "application/json", **headers}
        )
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == response.status_code and body["code"] and body["detail"]
