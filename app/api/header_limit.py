"""Cap request headers: at most MAX_HEADERS lines, MAX_HEADER_LINE_BYTES each, MAX_HEADER_BYTES in
all; more is a 431 problem.

Two layers, because what a server buffers before the app runs is the server's business:

* The server. uvicorn's default parser (httptools, when installed) buffers a request head of any
  size and any number of lines; h11 refuses a head larger than `--h11-max-incomplete-event-size`
  (default 16 KiB) with a 400 before the app sees it. Every launcher of the API (the README, the
  Dockerfile, the Kubernetes manifest, worker/localstack.py) therefore runs `UVICORN_HTTP_ARGS`:
  h11 with the head capped at MAX_HEADER_BYTES, so an oversized head costs the server at most that.
* The app. `HeaderLimitMiddleware` enforces all three caps whatever server runs it (httptools, a
  launcher that forgot the flags), with a 431 `request_header_fields_too_large` problem.

Real clients send about 10 to 30 headers of well under 1 KiB; an API key is 20 to 100 bytes.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.problems import send_problem

MAX_HEADERS = 100
MAX_HEADER_LINE_BYTES = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024

# uvicorn options that cap the request head in the parser (see the module docstring).
UVICORN_HTTP_ARGS = ["--http", "h11", "--h11-max-incomplete-event-size", str(MAX_HEADER_BYTES)]


class HeaderLimitMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            reason = oversized_headers(scope.get("headers", ()))
            if reason is not None:
                await send_problem(scope, send, 431, "request_header_fields_too_large", reason)
                return
        await self.app(scope, receive, send)


def oversized_headers(headers: list[tuple[bytes, bytes]] | tuple) -> str | None:
    """Why these headers exceed the caps, or None. A line counts as `name: value` (+4 bytes)."""
    if len(headers) > MAX_HEADERS:
        return f"{len(headers)} request headers; at most {MAX_HEADERS} are accepted."
    total = 0
    for name, value in headers:
        line = len(name) + len(value) + 4
        if line > MAX_HEADER_LINE_BYTES:
            return (
                f"The {name.decode('latin-1')[:64]} header is {line} bytes; at most "
                f"{MAX_HEADER_LINE_BYTES} are accepted per header."
            )
        total += line
    if total > MAX_HEADER_BYTES:
        return f"Request headers total {total} bytes; at most {MAX_HEADER_BYTES} are accepted."
    return None
