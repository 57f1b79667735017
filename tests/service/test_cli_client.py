"""`fapm submit/status/wait/cancel/jobs` against the real service, run as a user runs them: a
subprocess with FAPM_API_URL and FAPM_API_KEY in its environment.

Also: the client commands import no torch, and the client's event stream survives a dropped
connection (resumes with Last-Event-ID; an in-process mock server, since the real one does not
drop connections on demand).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import API_KEYS
from worker.client import ApiError, FapmClient, parse_sse

pytestmark = pytest.mark.timeout(300)


def fapm(
    *args: str, url: str | None, tenant: str | None = "alice", timeout: float = 180
) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process; the key goes only in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAPM_")}
    if url:
        env["FAPM_API_URL"] = url
    if tenant:
        env["FAPM_API_KEY"] = API_KEYS[tenant]
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for key in API_KEYS.values():  # a key is never echoed, whatever happened
        assert key not in result.stdout and key not in result.stderr
    return result


def pair_args(pair, out: Path) -> list[str]:
    return [
        "--base",
        f"file://{pair.base}",
        "--finetuned",
        f"file://{pair.finetuned}",
        "--out",
        f"file://{out}",
    ]


# -- no server needed -------------------------------------------------------------------------------


def test_client_commands_do_not_import_torch():
    code = (
        "import sys\n"
        "from worker.cli import main\n"
        "rc = main(['jobs'])\n"  # reaches the client, fails to connect: rc 1
        "assert rc == 1, rc\n"
        "bad = [m for m in ('torch', 'numba', 'safetensors', 'worker.engine') if m in sys.modules]\n"
        "print(','.join(bad) or 'clean')\n"
    )
    env = {**os.environ, "FAPM_API_URL": "http://127.0.0.1:9", "FAPM_API_KEY": "k"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
    assert "fapm: error [unreachable]" in result.stderr


def test_missing_api_key_is_a_usage_error():
    result = fapm("status", "some-job", url="http://127.0.0.1:9", tenant=None)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "FAPM_API_KEY is not set" in result.stderr


def test_webhook_secret_is_read_from_the_named_variable_only(tmp_path):
    result = fapm(
        "submit",
        *pair_args_stub(tmp_path),
        "--webhook-url",
        "https://example.com/h",
        "--webhook-secret-env",
        "FAPM_TEST_NO_SUCH_VAR",
        url="http://127.0.0.1:9",
    )
    assert result.returncode == 2
    assert "$FAPM_TEST_NO_SUCH_VAR is not set" in result.stderr


def pair_args_stub(tmp_path: Path) -> list[str]:
    return [
        "--base",
        str(tmp_path / "b"),
        "--finetuned",
        str(tmp_path / "f"),
        "--out",
        str(tmp_path / "o"),
    ]


def test_sse_parser_follows_the_eventsource_rules():
    stream = [
        ": keep-alive",
        "id: 1-0",
        "event: state",
        'data: {"status": "queued"}',
        "",
        "retry: 250",
        "data: line one",
        "data:line two",
        "",
        "event: ignored-without-data",
        "",
        "id: 2-0",
        "event: progress",
        'data: {"fraction": 0.5}',  # cut off: no blank line, never dispatched
    ]
    events = list(parse_sse(iter(stream)))
    assert events == [
        ("1-0", "state", '{"status": "queued"}', None),
        ("1-0", "message", "line one\nline two", 250),
    ]


def test_events_reconnect_with_last_event_id():
    """The first connection drops after two events and half a third; the second must ask for
    what follows the second event, and the iterator must yield each event once."""
    seen_headers: list[str | None] = []

    def first_stream():
        yield b'id: 1-0\nevent: state\ndata: {"status": "queued", "at": "t0"}\n\n'
        yield b'id: 2-0\nevent: state\ndata: {"status": "running", "at": "t1"}\n\n'
        yield b'id: 3-0\nevent: progress\ndata: {"fra'
        raise httpx.RemoteProtocolError("peer closed connection")

    def handler(request: httpx.Request) -> httpx.Response:
        seen_headers.append(request.headers.get("last-event-id"))
        if len(seen_headers) == 1:
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=first_stream()
            )
        body = (
            b'id: 3-0\nevent: progress\ndata: {"fraction": 0.5}\n\n'
            b": keep-alive\n\n"
            b'id: 4-0\nevent: state\ndata: {"status": "succeeded", "at": "t2"}\n\n'
            b'id: 5-0\nevent: state\ndata: {"status": "never-read"}\n\n'
        )
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    with FapmClient("http://api.test", "k", transport=httpx.MockTransport(handler)) as client:
        events = list(client.events("job1"))
    assert [e.id for e in events] == ["1-0", "2-0", "3-0", "4-0"]
    assert events[2].data == {"fraction": 0.5}
    assert events[-1].terminal
    assert seen_headers == [None, "2-0"]


def test_problem_json_becomes_a_typed_error():
    problem = {
        "type": "/problems/validation-error",
        "title": "Request validation failed",
        "status": 422,
        "detail": "1 invalid field: sparsity",
        "code": "validation_error",
        "errors": [{"field": "sparsity", "location": "body", "message": "too big\nreally"}],
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            422, json=problem, headers={"content-type": "application/problem+json"}
        )

    with FapmClient("http://api.test", "k", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ApiError) as caught:
            client.submit({"base": "x"})
    assert caught.value.status == 422
    assert caught.value.code == "validation_error"
    assert caught.value.one_line() == "1 invalid field: sparsity (sparsity: too big really)"


# -- against the service ----------------------------------------------------------------------------


@pytest.mark.slow
def test_submit_wait_writes_the_same_output_as_prune(service, service_pair, local_root):
    tag = uuid.uuid4().hex[:8]
    remote_out = local_root / f"cli-submit-{tag}"
    local_out = local_root / f"cli-prune-{tag}"
    result = fapm(
        "submit",
        *pair_args(service_pair, remote_out),
        "--sparsity",
        "0.8",
        "--shard-size",
        "200KB",
        "--label",
        f"run={tag}",
        "--wait",
        url=service.api_url,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    job_id = lines[0]
    assert lines[-1].startswith(f"job {job_id} wrote ")
    assert "kept" in lines[-1]
    assert f"fapm: job {job_id} succeeded" not in result.stderr  # the outcome goes to stdout
    assert "running" in result.stderr
    # `fapm prune` on the same pair: the service's output must be byte-identical.
    local = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "prune",
            "--base",
            str(service_pair.base),
            "--finetuned",
            str(service_pair.finetuned),
            "--out",
            str(local_out),
            "--sparsity",
            "0.8",
            "--shard-size",
            "200KB",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert local.returncode == 0, local.stderr
    remote_files = sorted(p.name for p in remote_out.glob("*.safetensors"))
    assert remote_files and remote_files == sorted(p.name for p in local_out.glob("*.safetensors"))
    for name in remote_files:
        assert (remote_out / name).read_bytes() == (local_out / name).read_bytes(), name

    status = fapm("status", job_id, "--json", url=service.api_url)
    assert status.returncode == 0
    record = json.loads(status.stdout)
    assert record["status"] == "succeeded" and record["labels"] == {"run": tag}
    assert record["progress"]["fraction"] == 1.0


@pytest.mark.slow
def test_wait_on_a_failed_job_exits_1_with_its_code(service, local_root):
    missing = local_root / f"no-such-model-{uuid.uuid4().hex[:8]}"
    out = local_root / f"cli-failed-{uuid.uuid4().hex[:8]}"
    submitted = fapm(
        "submit",
        "--base",
        f"file://{missing}",
        "--finetuned",
        f"file://{missing}",
        "--out",
        f"file://{out}",
        url=service.api_url,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    result = fapm("wait", job_id, url=service.api_url)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fapm: error [source_not_found]: job {job_id}: "), result.stderr
    assert not out.exists()


def test_status_jobs_and_cancel_on_a_queued_job(api_stack, local_root):
    tag = uuid.uuid4().hex[:8]
    out = local_root / f"cli-queued-{tag}"
    url = api_stack.api_url
    submitted = fapm(
        "submit",
        "--base",
        f"file://{local_root}/pair/base",
        "--finetuned",
        f"file://{local_root}/pair/finetuned",
        "--out",
        f"file://{out}",
        "--label",
        f"run={tag}",
        "--label",
        "kind=queued",
        url=url,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert f"fapm: job {job_id} queued" in submitted.stderr

    status = fapm("status", job_id, url=url)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"job {job_id}\n")
    assert "status:" in status.stdout and "queued" in status.stdout
    assert f"run={tag}" in status.stdout

    listed = fapm("jobs", "--label", f"run={tag}", "--json", url=url)
    assert listed.returncode == 0, listed.stderr
    assert [j["id"] for j in json.loads(listed.stdout)["jobs"]] == [job_id]
    table = fapm("jobs", "--status", "queued", "--label", f"run={tag}", url=url)
    assert table.returncode == 0 and job_id in table.stdout
    assert fapm("jobs", "--label", f"run={tag}", url=url, tenant="bob").stdout.count("\n") == 1

    cancelled = fapm("cancel", job_id, url=url)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"job {job_id} cancelled"
    assert json.loads(fapm("status", job_id, "--json", url=url).stdout)["status"] == "cancelled"
    # Cancelling again is refused (409: it is over), and waiting reports how it ended.
    again = fapm("cancel", job_id, url=url)
    assert again.returncode == 1 and again.stderr.startswith("fapm: error [")
    waited = fapm("wait", job_id, url=url, timeout=60)
    assert waited.returncode == 1
    assert (
        waited.stderr.strip().splitlines()[-1].startswith(f"fapm: error [cancelled]: job {job_id}")
    )


def test_another_tenants_job_is_unknown(api_stack, local_root):
    submitted = fapm("submit", *pair_args_stub(local_root), url=api_stack.api_url)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    result = fapm("status", job_id, url=api_stack.api_url, tenant="bob")
    assert result.returncode == 2
    assert result.stderr.startswith("fapm: error [") and result.stderr.count("\n") == 1
    assert fapm("cancel", job_id, url=api_stack.api_url).returncode == 0


def test_api_validation_error_is_one_line_with_exit_2(api_stack, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside-the-roots")
    result = fapm(
        "submit",
        "--base",
        f"file://{outside}/base",
        "--finetuned",
        f"file://{outside}/ft",
        "--out",
        f"file://{outside}/out",
        url=api_stack.api_url,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    line = result.stderr.strip()
    assert line.startswith("fapm: error [")
    assert "base: " in line  # the field error, after the detail
    assert "(" in line and line.endswith(")")


def test_a_wrong_key_is_a_usage_error(api_stack):
    env_key = {"FAPM_API_KEY": "not-a-key"}
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "jobs"],
        env={**os.environ, **env_key, "FAPM_API_URL": api_stack.api_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("fapm: error [") and "not-a-key" not in result.stderr
