"""Cap request bodies (FAPM_MAX_REQUEST_BYTES) with a 413 that is a problem like every other error.

FastAPI's own `max_body_size` answers a plain-text 413 from a middleware that runs before the
app's exception handlers; this one refuses an oversized Content-Length up front and raises an
HTTPException(413) from `receive` for chunked bodies, which the problem handlers then answer.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.problems import send_problem


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            await self._refuse(scope, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._detail())
            return message

        await self.app(scope, limited, send)

    def _detail(self) -> str:
        return f"Request bodies are limited to {self.max_bytes} bytes."

    async def _refuse(self, scope: Scope, send: Send) -> None:
        await send_problem(scope, send, 413, "content_too_large", self._detail())


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
