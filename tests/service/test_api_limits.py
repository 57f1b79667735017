"""Request-head limits over real HTTP with raw sockets: at most 100 headers, 8 KiB per header line
and 64 KiB in all. Two servers: the API as every launcher runs it (uvicorn h11, head capped at
64 KiB in the parser; worker/localstack.py, so `api_stack`) and plain uvicorn with httptools
(no parser cap): the app's own middleware answers 431 either way. And every launcher of the API
runs uvicorn with the same parser options.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.api.header_limit import (
    MAX_HEADER_BYTES,
    MAX_HEADER_LINE_BYTES,
    MAX_HEADERS,
    UVICORN_HTTP_ARGS,
)
from tests.deploy.helpers import compose, container_command, image_command, pod_spec, resources
from tests.service.conftest import API_KEYS
from worker.localstack import LocalStack, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
KEY = API_KEYS["alice"]


def raw_request(
    port: int, headers: list[tuple[str, str]], timeout: float = 20
) -> tuple[int, bytes]:
    """GET /v1/jobs with exactly these extra header lines; (status, body) of the answer. The server
    may close the connection before it has read all of a huge head: what it answered counts."""
    head = "GET /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += f"Authorization: Bearer {KEY}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head.encode("latin-1"))
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if _complete(answer):
                    break
        except ConnectionResetError:
            pass
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 "), answer[:200]
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def assert_431(status: int, body: bytes) -> dict:
    assert status == 431, (status, body[:300])
    problem = json.loads(body)
    assert problem["status"] == 431 and problem["code"] == "request_header_fields_too_large"
    return problem


@pytest.fixture(scope="module")
def httptools_api(api_stack: LocalStack, tmp_path_factory) -> Iterator[int]:
    """The API under plain uvicorn with httptools (no head cap in the parser), same Redis."""
    port = free_port()
    log = (tmp_path_factory.mktemp("httptools_api") / "api.log").open("wb")
    argv = [sys.executable, "-m", "uvicorn", "app.main:app", "--http", "httptools"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    process = subprocess.Popen(argv, env=api_stack.child_env(), stdout=log, stderr=log)
    try:
        wait_for_port(port, 30, process)
        yield port
    finally:
        process.terminate()
        process.wait(20)
        log.close()


TOO_MANY = [(f"X-Many-{i}", "1") for i in range(5000)]  # about 60 KB: under the parser cap
JUST_ENOUGH = [(f"X-Some-{i}", "1") for i in range(MAX_HEADERS - 3)]  # + Host, Authorization
LONG_LINE = [("X-Long", "a" * (MAX_HEADER_LINE_BYTES + 1))]
TOO_MUCH_IN_ALL = [(f"X-Big-{i}", "b" * 7000) for i in range(10)]  # each under 8 KiB


def test_normal_and_borderline_heads_are_served(api_stack, httptools_api):
    for port in (api_stack.api_port, httptools_api):
        assert raw_request(port, [("Accept", "application/json")])[0] == 200
        assert raw_request(port, JUST_ENOUGH)[0] == 200
        assert raw_request(port, [("X-Long", "a" * (MAX_HEADER_LINE_BYTES - 100))])[0] == 200


@pytest.mark.parametrize(
    "headers", [TOO_MANY, LONG_LINE, [*JUST_ENOUGH, ("X-One-More", "1"), ("X-Two", "2")]]
)
def test_too_many_or_too_long_headers_are_431_problems(api_stack, httptools_api, headers):
    for port in (api_stack.api_port, httptools_api):
        assert_431(*raw_request(port, headers))


def test_too_much_in_all_is_refused(api_stack, httptools_api):
    # httptools hands the whole head to the app: the middleware's total cap answers.
    problem = assert_431(*raw_request(httptools_api, TOO_MUCH_IN_ALL))
    assert str(MAX_HEADER_BYTES) in problem["detail"]
    # h11 refuses a head over 64 KiB in the parser, before the app: uvicorn's plain 400.
    status, _ = raw_request(api_stack.api_port, TOO_MUCH_IN_ALL)
    assert status in (400, 431)


def test_a_one_megabyte_header_is_refused_by_both_servers(api_stack, httptools_api):
    huge = [("X-Huge", "h" * 1_000_000)]
    status, _ = raw_request(api_stack.api_port, huge)
    assert status == 400  # h11: "Receive buffer too long" after 64 KiB, the rest unread
    assert_431(*raw_request(httptools_api, huge))
    # Both servers still serve the next request.
    for port in (api_stack.api_port, httptools_api):
        assert raw_request(port, [])[0] == 200


# -- every launcher runs uvicorn with the same parser options --------------------------------


def _has_http_args(argv: list[str]) -> bool:
    n = len(UVICORN_HTTP_ARGS)
    return any(argv[i : i + n] == UVICORN_HTTP_ARGS for i in range(len(argv) - n + 1))


def test_every_launcher_caps_the_request_head():
    _, cmd = image_command(ROOT / "docker" / "api.Dockerfile")
    assert cmd[:2] == ["uvicorn", "app.main:app"] and _has_http_args(cmd), cmd
    (container,) = pod_spec(resources("Deployment")["fapm-api"])["containers"]
    command = container_command(container, [])
    assert _has_http_args(command), command
    assert "command" not in compose()["services"]["api"]  # compose runs the image's CMD
    stack = LocalStack(ROOT)  # not started: only its argv is read
    assert _has_http_args(stack.api_argv()), stack.api_argv()
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "uvicorn app.main:app " + " ".join(UVICORN_HTTP_ARGS) in readme
