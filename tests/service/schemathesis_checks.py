"""A schemathesis check loaded by tests/service/test_openapi_schemathesis.py (config `hooks`).

positive_data_acceptance is configured to let the submission routes answer 422 to a body that
fits the schema, because some rules cannot be stated in JSON Schema: locations depend on the
server's configuration (FAPM_LOCAL_ROOTS, bucket and repo rules) and JobSpec has cross-field
rules (exactly one of finetuned and adapter, sparsity "auto" needs evaluate, ...). This check
keeps that allowance narrow: such a 422 must come from one of those rules (a validator's
`value_error`, or a location/idempotency/Hub rule code), never from a constraint the document
could have stated (a type, a length, a pattern, a missing field, a blank string).
"""

from __future__ import annotations

import schemathesis

# 422 codes for rules that depend on server configuration or on earlier requests.
SEMANTIC_CODES = {
    "invalid_location",
    "idempotency_key_reused",
    "invalid_hub_payload",
    "hub_rule_invalid",
}
SUBMISSION_ROUTES = {"/v1/jobs", "/v1/evaluations", "/v1/hooks/huggingface"}


@schemathesis.check
def positive_422_is_a_rule_the_schema_cannot_state(ctx, response, case) -> bool | None:
    mode = getattr(getattr(case.meta, "generation", None), "mode", None)
    if response.status_code != 422 or mode is None or not mode.is_positive:
        return None
    if case.operation.method.upper() != "POST" or case.operation.path not in SUBMISSION_ROUTES:
        return None
    problem = response.json()
    code = problem.get("code")
    if code in SEMANTIC_CODES:
        return None
    undocumented = [
        error
        for error in problem.get("errors") or []
        if error.get("type") != "value_error" or "must not be empty" in error.get("message", "")
    ]
    if code != "validation_error" or undocumented:
        raise AssertionError(
            "A body that fits the OpenAPI document was refused for a constraint the document "
            f"could state: {code} {undocumented or problem.get('detail')}"
        )
    return None
