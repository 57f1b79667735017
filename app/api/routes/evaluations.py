"""/v1/evaluations: submit a standalone evaluation, a job of kind "evaluation".

An evaluation measures a model the user already has against its base (and, optionally, its
fine-tuned reference), as `fapm eval` does: skill (exact match of the greedy completion),
completion loss and perplexity of each model, and the model's skill_kept and forgetting_left.
Nothing is pruned or published.

It is a job like any other, in the same store and on the same queues: POST here creates it, and
everything after that is the /v1/jobs contract unchanged (GET /v1/jobs/{id}, the list with
`kind=evaluation`, the events stream, cancel, the report, webhooks, quotas, Idempotency-Key and
tenant isolation). So there is one place to follow any job, and only the creation differs.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Response

from app.api import examples
from app.api.deps import ACCEPTED_HEADERS, IdempotencyKeyHeader, ServicesDep, TenantDep, accepted
from app.api.strict_json import StrictJSONRoute
from app.api.submission import normalize_idempotency_key
from app.core.problems import problem_responses
from app.jobs.records import EvaluationRequest, JobRecord

router = APIRouter(prefix="/v1/evaluations", tags=["jobs"], route_class=StrictJSONRoute)


@router.post(
    "",
    status_code=202,
    response_model=JobRecord,
    summary="Submit a standalone evaluation (a job of kind evaluation)",
    description=(
        "Measures `model` against `base` (and `finetuned`, when given) on `evaluate.task` "
        "(JSONL of {prompt, completion}: skill) and `evaluate.general` (JSONL of {text}: "
        "perplexity). Every location is checked as for POST /v1/jobs (schemes, "
        "FAPM_LOCAL_ROOTS, webhook SSRF rules); a bad one is 422. Answers 202 with the queued "
        "job (`kind: evaluation`) and `Location: /v1/jobs/{id}`: follow, list, cancel and read "
        "it there. When it succeeds, `result.output` is null and `result.report.evaluation` "
        "holds `references` (base, finetuned), `points` (the model's: skill, completion_loss, "
        "perplexity, skill_kept, forgetting_left) and `note` (why a measure is undefined, or "
        "what it is relative to). Bad evaluation data fails the job with a stable code "
        "(bad_eval_data, empty_eval_set, not_causal_lm). Idempotency-Key works as for jobs "
        "(one key space per tenant across both endpoints)."
    ),
    responses={
        202: {
            "description": "Accepted: the evaluation job is queued.",
            "headers": ACCEPTED_HEADERS,
        },
        **problem_responses(400, 401, 409, 413, 422, 429, 503),
    },
)
def submit_evaluation(
    services: ServicesDep,
    tenant: TenantDep,
    response: Response,
    evaluation: Annotated[
        EvaluationRequest, Body(openapi_examples=examples.EVALUATION_REQUEST_EXAMPLES)
    ],
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobRecord:
    key = normalize_idempotency_key(idempotency_key)
    return accepted(services.submitter.submit(tenant, evaluation, key), response)
