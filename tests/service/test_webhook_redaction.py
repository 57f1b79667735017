"""A webhook URL's query (often a token) is never shown: job records over the API (submission,
GET, list), the delivered event's `data` and the worker and API logs show `REDACTED` in its
place, while the worker still delivers to the full URL. Real stack: redis-server, uvicorn, a
Celery worker and a receiver on 127.0.0.1 (allowed by FAST_ENV's FAPM_WEBHOOK_ALLOW)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.jobs.records import redacted_url
from tests.service.conftest import client

TOKEN = "tok-9f8e7d6c5b4a"


class PathReceiver:
    """Records the request line's target (path and query) and body of each POST."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.seen.append((self.path, body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]


@pytest.fixture
def receiver() -> Iterator[PathReceiver]:
    receiver = PathReceiver()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://h.example/p?token=abc&v=2", "https://h.example/p?token=REDACTED&v=REDACTED"),
        ("https://h.example:8443/p?abc#frag", "https://h.example:8443/p?REDACTED"),
        ("http://[::1]:9/x?a=b", "http://[::1]:9/x?a=REDACTED"),
        ("https://h.example/p", "https://h.example/p"),
    ],
)
def test_redacted_url_keeps_scheme_host_path_and_hides_query_values(url, shown):
    assert redacted_url(url) == shown


def test_webhook_query_is_redacted_everywhere_but_delivered_in_full(service, local_root, receiver):
    url = f"http://127.0.0.1:{receiver.port}/hook?token={TOKEN}&team=nlp"
    shown = f"http://127.0.0.1:{receiver.port}/hook?token=REDACTED&team=REDACTED"
    body = {  # inputs that do not exist: the job fails at once, and its webhook is sent
        "base": str(local_root / "no-such-base"),
        "finetuned": str(local_root / "no-such-sft"),
        "output": str(local_root / "out" / "redaction"),
        "webhook": {"url": url},
    }
    with client(service) as http:
        submitted = http.post("/v1/jobs", json=body)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        deadline = time.monotonic() + 60
        while not receiver.seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.seen, "no webhook delivery within 60 s"
        answers = [
            submitted,
            http.get(f"/v1/jobs/{job_id}"),
            http.get("/v1/jobs", params={"limit": 200}),
        ]
    for answer in answers:
        assert TOKEN not in answer.text
    assert answers[0].json()["webhook"]["url"] == shown
    assert answers[1].json()["webhook"]["url"] == shown

    path, delivered = receiver.seen[0]
    assert path == f"/hook?token={TOKEN}&team=nlp"  # delivered to the full URL
    assert TOKEN not in delivered.decode()
    assert json.loads(delivered)["data"]["webhook"]["url"] == shown

    time.sleep(0.5)  # the worker logs the delivery after the receiver answered
    for process in service.processes:
        if process.name in ("api", "worker"):
            assert TOKEN not in process.log.read_text(errors="replace"), process.name
    assert "REDACTED" in next(p for p in service.processes if p.name == "worker").log.read_text()
