"""The fapm-service API application: `uvicorn app.main:app`.

Imports no torch (nor worker.tasks / worker.engine): the API enqueues by task name and shares only
the torch-free JobSpec with the workers, so it starts in a second and runs on small machines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app.api.body_limit import BodyLimitMiddleware
from app.api.header_limit import HeaderLimitMiddleware
from app.api.routes import evaluations, events, health, hooks, jobs, mlflow_hooks
from app.api.services import Services
from app.api.webhooks_out import declare_outbound_webhooks
from app.core.config import Settings, get_settings
from app.core.problems import install_problem_handlers, move_problem_schemas

DESCRIPTION = """
Prune fine-tuned checkpoints as a service: submit a job (base + fine-tuned model or adapter,
method, sparsity, output URI), follow it over Server-Sent Events, get a signed webhook when it
ends.

* Auth: `Authorization: Bearer <key>` or `X-API-Key: <key>` on every `/v1` route. A key belongs
  to a tenant; a tenant sees only its own jobs.
* Errors: RFC 9457 `application/problem+json` with a stable `code` and, for invalid input,
  `errors[]` naming each field.
* Quotas: a tenant may have FAPM_MAX_ACTIVE_JOBS_PER_TENANT queued + running jobs; more is 429
  with `Retry-After`.
"""

TAGS = [
    {
        "name": "jobs",
        "description": "Submit, follow, cancel and inspect jobs: pruning (POST /v1/jobs) and "
        "standalone evaluation (POST /v1/evaluations, kind evaluation).",
    },
    {"name": "webhooks in", "description": "Triggers from model registries."},
    {"name": "operations", "description": "Probes and metrics (no auth)."},
]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    services = Services.build(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await services.aclose()

    app = FastAPI(
        title="fapm-service",
        version="1.0.0",
        summary="Forgetting-aware pruning of fine-tuned checkpoints, as a service.",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.services = services
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(HeaderLimitMiddleware)  # added last: runs first
    install_problem_handlers(app)
    for module in (jobs, evaluations, events, hooks, mlflow_hooks, health):
        app.include_router(module.router)
    declare_outbound_webhooks(app)

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()
            move_problem_schemas(schema)
            _parameters_are_never_null(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _parameters_are_never_null(openapi: dict[str, Any]) -> None:
    """FastAPI documents an optional header or query parameter (`str | None = None`) as
    `anyOf: [string, null]`; a header or query value is never JSON null (it is absent), and
    generators that trust the document send the text "null". Keep the non-null schema."""
    for path in openapi.get("paths", {}).values():
        for operation in path.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                options = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
                if len(options) == 1 and len(options) < len(schema["anyOf"]):
                    rest = {k: v for k, v in schema.items() if k != "anyOf"}
                    parameter["schema"] = {**options[0], **rest}


app = create_app()
