"""A small HTTP client for the fapm-service REST API v1 (what `fapm submit/status/wait/...` use).

Records come back as the API's JSON (plain dicts), not as the server's pydantic models, so a client
keeps working when a newer server adds fields. Every non-2xx answer raises `ApiError`, which carries
the RFC 9457 problem document. `events()` follows a job's Server-Sent Events stream and reconnects
with `Last-Event-ID` after a dropped connection, so a caller sees every event once, in order, until
the job ends. Imports httpx only (no torch, no server code).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_API_URL = "http://127.0.0.1:8000"


class ClientError(Exception):
    """The API could not be reached, or its answer made no sense (not a problem document)."""


class ApiError(ClientError):
    """A non-2xx answer. `problem` is the problem+json body (type, title, status, detail, errors?);
    for a body that is not one, a stand-in with the status and the first bytes of the text."""

    def __init__(self, status: int, problem: Mapping[str, Any], headers: Mapping[str, str]):
        self.status = status
        self.problem = dict(problem)
        self.retry_after = headers.get("retry-after")
        super().__init__(self.one_line())

    @property
    def title(self) -> str:
        return str(self.problem.get("title") or f"HTTP {self.status}")

    @property
    def detail(self) -> str | None:
        detail = self.problem.get("detail")
        return str(detail) if detail else None

    @property
    def code(self) -> str:
        """A stable, machine-readable name: the problem's `code` (e.g. `validation_error`), else
        the last segment of its type URI, else `http_<status>`."""
        if self.problem.get("code"):
            return str(self.problem["code"])
        kind = str(self.problem.get("type") or "")
        if kind and kind != "about:blank":
            return kind.rstrip("/").rsplit("/", 1)[-1].rsplit("#", 1)[-1] or f"http_{self.status}"
        return f"http_{self.status}"

    def field_errors(self) -> list[str]:
        """The invalid fields as `field: message` strings, whatever shape the server used
        (pydantic's {loc, msg}, or {field|pointer|name, message|detail})."""
        out = []
        for item in self.problem.get("errors") or []:
            if not isinstance(item, Mapping):
                out.append(str(item))
                continue
            where = item.get("loc") or item.get("field") or item.get("pointer") or item.get("name")
            if isinstance(where, list | tuple):
                # pydantic puts the request part first ("body", "base"); the field is what matters
                parts = [str(p) for p in where]
                if len(parts) > 1 and parts[0] in ("body", "query", "path", "header"):
                    parts = parts[1:]
                where = ".".join(parts)
            message = item.get("msg") or item.get("message") or item.get("detail") or ""
            out.append(f"{where}: {message}" if where else str(message))
        return out

    def one_line(self) -> str:
        """The title or detail and the field errors on one line, for a terminal."""
        text = self.detail or self.title
        # Field errors the detail does not already spell out (servers often summarise them there).
        fields = [f for f in self.field_errors() if f not in text]
        if fields:
            text = f"{text} ({'; '.join(fields)})"
        if self.retry_after:
            text = f"{text}; retry after {self.retry_after} s"
        return " ".join(text.split())  # a multi-line detail stays one line


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: `id` the Redis stream id, `event` 'state' or 'progress', `data`
    the decoded JSON (a state: {status, at, error?, result?}; a progress object)."""

    id: str | None
    event: str
    data: Any

    @property
    def terminal(self) -> bool:
        return (
            self.event == "state"
            and isinstance(self.data, Mapping)
            and (self.data.get("status") in TERMINAL_STATUSES)
        )


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str, str, int | None]]:
    """Yield (id, event, data, retry_ms) per dispatched event from an SSE line stream, as the
    WHATWG EventSource algorithm does: `field: value` lines (one optional space after the colon),
    `:` comment lines (keep-alives) ignored, multi-line data joined by newlines, a blank line ends
    an event, an event with no data is not dispatched. `id` is the last id seen on the stream
    (it persists across events), as a reconnect's Last-Event-ID must be."""
    last_id: str | None = None
    event_type = ""
    data: list[str] = []
    retry: int | None = None
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield last_id, event_type or "message", "\n".join(data), retry
            event_type, data, retry = "", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)
    # A stream cut off mid-event: the partial event is dropped (the spec says so, and a
    # reconnect with Last-Event-ID re-sends it).


class FapmClient:
    """Talks to one API with one key. Thread-safe (httpx.Client is); close() or use `with`."""

    def __init__(
        self,
        base_url: str = DEFAULT_API_URL,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Accept": "application/json", "User-Agent": "fapm-cli"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FapmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self._http.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise _api_error(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise ClientError(f"{method} {path}: the answer is not JSON") from exc

    def submit(
        self,
        spec: Mapping[str, Any],
        *,
        labels: Mapping[str, str] | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict:
        """POST /v1/jobs: the JobSpec fields (JSON-ready) plus labels and webhook; returns the
        new (or, for a repeated Idempotency-Key, the earlier) job record."""
        body: dict[str, Any] = dict(spec)
        if labels:
            body["labels"] = dict(labels)
        if webhook_url:
            body["webhook"] = {"url": webhook_url}
            if webhook_secret:
                body["webhook"]["secret"] = webhook_secret
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/jobs", json=body, headers=headers)

    def submit_evaluation(
        self,
        spec: Mapping[str, Any],
        *,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict:
        """POST /v1/evaluations: the EvaluationJobSpec fields (JSON-ready) plus labels; returns
        the job record (kind "evaluation"), followed like any job with get/events/cancel."""
        body: dict[str, Any] = dict(spec)
        if labels:
            body["labels"] = dict(labels)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/evaluations", json=body, headers=headers)

    def get(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{_segment(job_id)}")

    def list(
        self,
        *,
        status: str | None = None,
        label: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict:
        """GET /v1/jobs: one page, {jobs: [...], next_cursor}. `label` is `key=value`."""
        params = {"status": status, "label": label, "limit": limit, "cursor": cursor}
        return self._json("GET", "/v1/jobs", params={k: v for k, v in params.items() if v})

    def iter_jobs(
        self, *, status: str | None = None, label: str | None = None, page_size: int = 100
    ) -> Iterator[dict]:
        """Every matching job, newest first, following the cursor."""
        cursor = None
        while True:
            page = self.list(status=status, label=label, limit=page_size, cursor=cursor)
            yield from page.get("jobs", [])
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, job_id: str) -> dict:
        """POST /v1/jobs/{id}/cancel: the record after the request (cancelled, or running with
        cancel_requested). A finished job raises ApiError 409."""
        return self._json("POST", f"/v1/jobs/{_segment(job_id)}/cancel")

    def report(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{_segment(job_id)}/report")

    # -- events -----------------------------------------------------------------------------------

    def events(
        self,
        job_id: str,
        *,
        last_event_id: str | None = None,
        max_failures: int = 8,
        read_timeout: float = 60.0,
    ) -> Iterator[Event]:
        """GET /v1/jobs/{id}/events, until the job's terminal state event.

        A dropped connection, a read timeout (no event and no keep-alive for `read_timeout` s),
        a 5xx or a stream that ends before the terminal event reconnects with the last seen event
        id, so no event is lost or repeated. `max_failures` connection attempts in a row that get
        no event raise ClientError; a 4xx raises ApiError at once.
        """
        failures = 0
        delay_ms = 500
        timeout = httpx.Timeout(self._http.timeout.connect or 10.0, read=read_timeout)
        path = f"/v1/jobs/{_segment(job_id)}/events"
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            got_event = False
            problem: Exception | None = None
            try:
                with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                    if response.status_code >= 400:
                        response.read()
                        error = _api_error(response)
                        if response.status_code < 500:
                            raise error
                        problem = error
                    else:
                        for event_id, kind, data, retry in parse_sse(response.iter_lines()):
                            if retry is not None:
                                delay_ms = retry
                            if event_id is not None:
                                last_event_id = event_id
                            got_event = True
                            event = Event(event_id, kind, _decode(data))
                            yield event
                            if event.terminal:
                                return
                        problem = ClientError("the event stream ended before the job did")
            except httpx.ReadTimeout as exc:
                # Quiet for read_timeout s: not a failure (a long queue wait with no keep-alives);
                # reconnecting re-checks the job and keeps idle proxies from cutting us off.
                problem = exc
                got_event = True
            except httpx.HTTPError as exc:
                problem = exc
            failures = 0 if got_event else failures + 1
            if failures >= max_failures:
                raise ClientError(
                    f"lost the event stream of job {job_id} after {failures} attempts: {problem}"
                ) from problem
            if failures:
                time.sleep(min(delay_ms / 1000 * 2 ** (failures - 1), 15.0))


def _segment(job_id: str) -> str:
    """A job id as one URL path segment (an id with a slash must not reach another route)."""
    return quote(job_id, safe="")


def _decode(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data


def _api_error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, Mapping):
        # Not a problem document (a proxy's HTML page, FastAPI's plain {"detail": ...}).
        text = response.text.strip()[:200]
        body = {"status": response.status_code, "detail": text or response.reason_phrase}
    elif "title" not in body and "type" not in body and isinstance(body.get("detail"), list):
        # FastAPI's default 422 shape: {"detail": [pydantic errors]}.
        body = {"status": response.status_code, "title": "Validation error",
                "errors": body["detail"]}  # fmt: skip
    return ApiError(response.status_code, body, response.headers)


__all__ = ["DEFAULT_API_URL", "ApiError", "ClientError", "Event", "FapmClient", "parse_sse"]
