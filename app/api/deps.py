"""Request dependencies: the shared services, the authenticated tenant, and the pieces the
submission routes share.

Both security schemes are declared with `auto_error=False` so that FastAPI lists them in the
OpenAPI document while the 401 stays ours (a problem+json body, one message for "missing" and
"wrong", and a WWW-Authenticate challenge).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request, Response, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.api.services import Services
from app.api.submission import Submitted
from app.core.problems import ProblemError
from app.jobs.records import JobRecord

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="BearerAuth",
    description="`Authorization: Bearer <api key>`.",
)
api_key_scheme = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="ApiKeyHeader",
    description="The same API key in an `X-API-Key` header.",
)


async def get_services(request: Request) -> Services:
    # async on purpose: FastAPI runs a sync dependency in its threadpool, a hop per request.
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def current_tenant(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    api_key: Annotated[str | None, Security(api_key_scheme)],
) -> str:
    """The tenant the API key belongs to; 401 problem otherwise. The key itself is never logged
    or stored; only its SHA-256 digest is compared."""
    key = bearer.credentials if bearer is not None else api_key
    tenant = request.app.state.services.keys.tenant_for(key) if key else None
    if tenant is None:
        raise ProblemError(
            401,
            "unauthorized",
            "A valid API key is required: `Authorization: Bearer <key>` or `X-API-Key: <key>`.",
            headers={"WWW-Authenticate": 'Bearer realm="fapm"'},
        )
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]


# What normalize_idempotency_key accepts, for the OpenAPI document: 1 to 255 printable ASCII
# characters without spaces, optionally in double quotes (a structured-field string); `""` is
# empty. The 400 stays ours (invalid_idempotency_key), so the pattern is documented, not enforced
# by FastAPI (tests/service/test_openapi_schemathesis.py checks the two agree).
IDEMPOTENCY_KEY_PATTERN = r'^(?:"[!-~]{1,255}"|(?!".*"$)[!-~]{1,255})$'

# The Idempotency-Key header of the submission routes (POST /v1/jobs, POST /v1/evaluations).
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description='A unique key per intended job, e.g. a UUID (`"..."` quoting optional); '
        "any other value is a 400 `invalid_idempotency_key`.",
        json_schema_extra={"pattern": IDEMPOTENCY_KEY_PATTERN},
    ),
]


# The 202 answer's headers, as the OpenAPI document declares them for both submission routes.
ACCEPTED_HEADERS = {
    "Location": {"description": "/v1/jobs/{id}", "schema": {"type": "string"}},
    "Idempotent-Replayed": {
        "description": "`true` when an earlier job with this Idempotency-Key is returned.",
        "schema": {"type": "string"},
    },
}


def accepted(submitted: Submitted, response: Response) -> JobRecord:
    """The 202 answer of a submission: the record, its Location, and whether it is a replay."""
    response.headers["Location"] = f"/v1/jobs/{submitted.record.id}"
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return submitted.record
