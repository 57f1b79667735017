"""Every error the API answers is an RFC 9457 problem (`application/problem+json`).

Clients (the CLI, pipelines) branch on `status` and the stable `code`, and show `detail` and the
per-field `errors` to people. One shape for all of them: our own refusals (`ProblemError`),
FastAPI's request validation, Starlette's 404/405/413, Redis outages and, as a last resort, bugs.
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope, Send

log = logging.getLogger("app.problems")

PROBLEM_MEDIA_TYPE = "application/problem+json"
# Problem types are relative URI references (RFC 9457 §3.1.1), resolved against the API's URL.
TYPE_PREFIX = "/problems/"

# pydantic prefixes the message of a ValueError raised in a validator with this.
_VALUE_ERROR_PREFIX = "Value error, "
# JobSpec's model validators start their message with the field they are about ("finetuned: ...").
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): (.+)$", re.S)
# RFC 9110 names where Python's http module still has the older ones.
_PHRASES = {413: "Content Too Large", 422: "Unprocessable Content"}


class FieldError(BaseModel):
    """One invalid input: where it is and what is wrong with it."""

    field: str = Field(
        description="Dotted path of the field, e.g. `webhook.url`; '' for the whole body."
    )
    location: str = Field(description="body, query, header or path.")
    message: str
    type: str | None = Field(default=None, description="pydantic error type, e.g. `missing`.")


class Problem(BaseModel):
    """RFC 9457 problem details, plus `code` (stable, machine-readable) and `errors`."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": "/problems/validation-error",
                    "title": "Request validation failed",
                    "status": 422,
                    "detail": "1 invalid field: sparsity",
                    "instance": "/v1/jobs",
                    "code": "validation_error",
                    "errors": [
                        {
                            "field": "sparsity",
                            "location": "body",
                            "message": "Input should be less than or equal to 1",
                            "type": "less_than_equal",
                        }
                    ],
                }
            ]
        },
    )

    type: str = Field(default="about:blank", description="URI reference naming the problem type.")
    title: str = Field(description="Short summary of the problem type.")
    status: int = Field(description="The HTTP status code.")
    detail: str | None = Field(default=None, description="What went wrong this time.")
    instance: str | None = Field(default=None, description="The request path.")
    code: str = Field(description="Stable machine-readable code, e.g. `quota_exceeded`.")
    errors: list[FieldError] | None = Field(
        default=None, description="Per-field errors (validation problems)."
    )


class ProblemError(Exception):
    """Raise from a route to answer a problem; `extra` members are added to the body."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str | None = None,
        *,
        title: str | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or code)
        self.status = status
        self.code = code
        self.title = title or _PHRASES.get(status) or HTTPStatus(status).phrase
        self.detail = detail
        self.errors = errors
        self.headers = headers
        self.extra = extra


def problem_response(
    request: Request,
    status: int,
    code: str,
    *,
    title: str | None = None,
    detail: str | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
    problem_type: str | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": problem_type or TYPE_PREFIX + code.replace("_", "-"),
        "title": title or _PHRASES.get(status) or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "code": code,
    }
    if errors is not None:
        body["errors"] = [e.model_dump() for e in errors]
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


async def send_problem(scope: Scope, send: Send, status: int, code: str, detail: str) -> None:
    """Answer a problem straight from an ASGI middleware (one that refuses a request before the
    app, and so its exception handlers, sees it), and close the connection after it."""
    body = json.dumps(
        {
            "type": "about:blank",  # plain HTTP semantics, as for Starlette's own errors
            "title": _PHRASES.get(status) or HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
            "instance": scope.get("path"),
            "code": code,
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def field_errors_from_pydantic(errors: list[dict[str, Any]]) -> list[FieldError]:
    """pydantic/FastAPI error dicts -> FieldErrors with dotted field names.

    Errors from a model validator have no field in `loc`; JobSpec names the field at the start of
    its message, so it is moved into `field`.
    """
    out = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        location = loc[0] if loc and loc[0] in ("body", "query", "header", "path", "cookie") else ""
        parts = loc[1:] if location else loc
        message = str(error.get("msg", "invalid"))
        if message.startswith(_VALUE_ERROR_PREFIX):
            message = message[len(_VALUE_ERROR_PREFIX) :]
        if error.get("type") == "json_invalid":
            parts = []  # loc holds a character offset, not a field
        elif not parts or parts[-1] in ("function-after", "function-before"):
            match = _FIELD_PREFIX.match(message)
            if match:
                parts, message = [match.group(1)], match.group(2)
        out.append(
            FieldError(
                field=".".join(parts),
                location=location or "body",
                message=message,
                type=error.get("type"),
            )
        )
    return out


def _summary(errors: list[FieldError]) -> str:
    names = sorted({e.field or "(body)" for e in errors})
    noun = "invalid field" if len(errors) == 1 else "invalid fields"
    return f"{len(errors)} {noun}: {', '.join(names)}"


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(
        request,
        exc.status,
        exc.code,
        title=exc.title,
        detail=exc.detail,
        errors=exc.errors,
        headers=exc.headers,
        **exc.extra,
    )


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = field_errors_from_pydantic(list(exc.errors()))
    return problem_response(
        request,
        422,
        "validation_error",
        title="Request validation failed",
        detail=_summary(errors),
        errors=errors,
    )


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    phrase = _PHRASES.get(exc.status_code) or HTTPStatus(exc.status_code).phrase
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else None
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    headers = exc.headers
    if exc.status_code == 405:
        # Starlette's Allow names the methods of the first route on the path only (POST for
        # /v1/jobs); RFC 9110 §15.5.6 wants every method the resource supports.
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    return problem_response(
        request,
        exc.status_code,
        code,
        title=phrase,
        detail=detail,
        headers=headers,
        problem_type="about:blank",  # RFC 9457 §4.2.1: plain HTTP semantics
    )


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    pending = list(request.app.routes)
    while pending:
        route = pending.pop()
        included = getattr(route, "original_router", None)  # FastAPI's included routers
        if included is not None:
            pending.extend(included.routes)
        elif getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


async def _on_redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable during %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        request,
        503,
        "store_unavailable",
        detail="The job store (Redis) is not reachable; try again shortly.",
        headers={"Retry-After": "5"},
    )


async def _on_bug(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input: logged with its traceback (never with request headers, which may hold
    # an API key), answered in the same shape so clients need one error parser.
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return problem_response(
        request, 500, "internal_error", detail="An unexpected error occurred; it has been logged."
    )


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(redis.ConnectionError, _on_redis_down)
    app.add_exception_handler(redis.TimeoutError, _on_redis_down)
    app.add_exception_handler(Exception, _on_bug)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries declaring problem bodies for these statuses."""
    descriptions = {
        400: "Malformed request (e.g. a bad Idempotency-Key).",
        401: "Missing or invalid API key.",
        404: "No such job for this tenant.",
        409: "Conflict with the job's current state (or an Idempotency-Key still in flight).",
        413: "Request body too large.",
        422: "Invalid request: the `errors` member names each invalid field.",
        429: "The tenant has too many queued and running jobs; see Retry-After.",
        503: "A dependency (Redis, the task queue) is unavailable; retry later.",
    }
    return {
        status: {
            "model": Problem,
            "description": descriptions.get(status, HTTPStatus(status).phrase),
        }
        for status in statuses
    }


def move_problem_schemas(openapi: dict[str, Any]) -> None:
    """FastAPI files `responses={..: {"model": Problem}}` under the route's media type
    (application/json, or text/event-stream for the events route); error bodies are
    application/problem+json, so move them there in the generated document."""
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for path in openapi.get("paths", {}).values():
        for operation in path.values():
            if not isinstance(operation, dict):
                continue
            for status, response in operation.get("responses", {}).items():
                if not str(status).isdigit() or int(status) < 400:
                    continue
                content = response.get("content", {})
                media = content.get(PROBLEM_MEDIA_TYPE) or next(iter(content.values()), {})
                response["content"] = {PROBLEM_MEDIA_TYPE: {**media, "schema": problem_ref}}
    schemas = openapi.get("components", {}).get("schemas", {})
    # FastAPI's default 422 models are replaced by Problem everywhere.
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
