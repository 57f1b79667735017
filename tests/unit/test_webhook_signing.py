"""Standard Webhooks signing of outbound webhooks (worker/webhooks.py) and the retry schedule."""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from app.core.config import Settings
from worker.webhooks import _client, next_delay, sign, signed_headers, signing_key, verify

# The published Standard Webhooks test vector (the reference libraries test against it).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_standard_webhooks_vector():
    assert sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE
    header = f"v1,bm9wZQ== {VECTOR_SIGNATURE}"  # several signatures: any may match
    assert verify(VECTOR_SECRET, VECTOR_ID, str(VECTOR_TIMESTAMP), VECTOR_BODY, header)


@pytest.mark.parametrize(
    "change",
    [
        {"body": VECTOR_BODY + b" "},
        {"webhook_id": "msg_other"},
        {"timestamp": str(VECTOR_TIMESTAMP + 1)},
        {"secret": "whsec_" + base64.b64encode(b"another key of 24 bytes!").decode()},
    ],
)
def test_any_change_breaks_the_signature(change):
    args = {
        "secret": VECTOR_SECRET,
        "webhook_id": VECTOR_ID,
        "timestamp": str(VECTOR_TIMESTAMP),
        "body": VECTOR_BODY,
        **change,
    }
    assert not verify(**args, signatures=VECTOR_SIGNATURE)


def test_secret_without_prefix_is_used_as_utf8_bytes():
    secret = "plain shared secret ü"
    assert signing_key(secret) == secret.encode()
    expected = hmac.new(secret.encode(), b"msg_1.10.{}", hashlib.sha256).digest()
    assert sign(secret, "msg_1", 10, b"{}") == "v1," + base64.b64encode(expected).decode()
    # A whsec_ prefix on something that is not base64: the whole string is the key.
    assert signing_key("whsec_not base64!") == b"whsec_not base64!"


def test_headers_without_a_secret_carry_no_signature():
    headers = signed_headers(None, "msg_1", b"{}")
    assert headers["webhook-id"] == "msg_1" and headers["webhook-timestamp"].isdigit()
    assert "webhook-signature" not in headers
    signed = signed_headers("s3cret", "msg_1", b"{}")
    assert verify(
        "s3cret", "msg_1", signed["webhook-timestamp"], b"{}", signed["webhook-signature"]
    )


def test_backoff_doubles_with_bounded_jitter_and_honours_retry_after():
    settings = Settings(webhook_first_retry_seconds=2.0)
    for attempt, base in [(1, 2.0), (2, 4.0), (3, 8.0), (6, 64.0)]:
        delays = [next_delay(attempt, settings) for _ in range(200)]
        assert all(0.75 * base <= d <= 1.25 * base for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert next_delay(1, settings, retry_after=30.0) == 30.0


def test_delivery_connects_to_the_checked_address_not_a_fresh_lookup():
    """The client dials the addresses the SSRF check approved; the URL's host name is only the
    Host header (and the TLS name), so a second DNS answer cannot redirect the connection."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.headers["host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        # `.invalid` never resolves (RFC 6761): only the pinned address can be reached.
        with _client(["127.0.0.1"], timeout=5) as client:
            response = client.post(f"http://hooks.invalid:{port}/x", content=b"{}")
        assert response.status_code == 204 and seen == [f"hooks.invalid:{port}"]
    finally:
        server.shutdown()
        server.server_close()
