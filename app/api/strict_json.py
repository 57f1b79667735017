"""The one place request bodies are decoded: strict UTF-8 JSON of valid Unicode text.

FastAPI decodes a JSON body with `json.loads(bytes)`, which lets through what is not text: a
`"\\ud800"` escape (or its raw UTF-8 form) becomes a `str` with a lone surrogate that no response,
log or webhook can encode, so a job stored with one in a label failed every read of the tenant's
jobs with a 500. Every route with a body uses `StrictJSONRoute` (its router's `route_class`),
which decodes the body before FastAPI does and answers 422 `validation_error` for:

* bytes that are not UTF-8 (RFC 8259 §8.1: JSON exchanged between systems is UTF-8),
* text that is not JSON, nested too deeply for the parser, or with an integer too long to convert,
* any string, object key or value, anywhere in the body, holding a lone surrogate
  (`errors[].type` `invalid_unicode`, `errors[].field` the dotted path).

The decoded value is handed to FastAPI, so the body is parsed once. A subclass can run checks
that must come before the body is read at all (`before_body`: the Hub webhook's secret).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from app.core.problems import FieldError, ProblemError
from app.core.unicode_text import lone_surrogate


class _DecodedJSONRequest(Request):
    """A request whose JSON body was decoded (and checked) before the route's handler ran."""

    decoded: Any = None

    async def json(self) -> Any:
        return self.decoded


class StrictJSONRoute(APIRoute):
    async def before_body(self, request: Request) -> None:
        """Checks that must pass before the body is read (none by default)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def strict_handler(request: Request) -> Response:
            await self.before_body(request)
            decoded_request = _DecodedJSONRequest(request.scope, request.receive)
            body = await decoded_request.body()
            if body:
                decoded_request.decoded = decode_json_body(body)
            return await handler(decoded_request)

        return strict_handler


def _not_json(name: str) -> Any:
    # Python's json reads NaN, Infinity and -Infinity; RFC 8259 has no such values.
    raise ValueError(f"{name} is not JSON (RFC 8259 has no non-finite numbers)")


def decode_json_body(body: bytes) -> Any:
    """The JSON value of a request body; a 422 problem unless it is UTF-8 JSON of valid
    Unicode text."""
    try:
        text = body.decode("utf-8")  # strict: refuses invalid bytes and UTF-8-encoded surrogates
    except UnicodeDecodeError as exc:
        raise _json_invalid(
            f"byte {exc.start} is not UTF-8 (JSON bodies are UTF-8)", exc.start
        ) from exc
    try:
        value = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        raise _json_invalid(exc.msg, exc.pos) from exc
    except RecursionError as exc:
        raise _json_invalid("nested too deeply", 0) from exc
    except ValueError as exc:  # e.g. an integer beyond Python's int/str conversion limit
        raise _json_invalid(str(exc), 0) from exc
    found = lone_surrogate(value)
    if found is not None:
        raise ProblemError(
            422,
            "validation_error",
            f"{found.path or '(body)'}: {found.describe()}",
            title="Request validation failed",
            errors=[
                FieldError(
                    field=found.path,
                    location="body",
                    message=found.describe(),
                    type="invalid_unicode",
                )
            ],
        )
    return value


def _json_invalid(reason: str, position: int) -> RequestValidationError:
    # The same error FastAPI raises for a body it cannot decode, with the reason in the message.
    return RequestValidationError(
        [
            {
                "type": "json_invalid",
                "loc": ("body", position),
                "msg": f"JSON decode error: {reason}",
                "input": {},
                "ctx": {"error": reason},
            }
        ]
    )
