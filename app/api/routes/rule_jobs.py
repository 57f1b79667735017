"""What the rule-driven webhooks (hooks.py, mlflow_hooks.py) share once a rule has matched: the
422 for a job the rule makes invalid, and submitting the job under the event's own key."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from app.api.services import Services
from app.core.problems import ProblemError, field_errors_from_pydantic
from app.jobs.records import JobRequest

Answer = TypeVar("Answer", bound=BaseModel)


def invalid_job(code: str, detail: str, exc: ValidationError) -> ProblemError:
    """A 422 naming each field of the rule's job that JobRequest refused."""
    return ProblemError(422, code, detail, errors=field_errors_from_pydantic(list(exc.errors())))


def submit_rule_job(
    services: Services, answer: type[Answer], tenant: str, request: JobRequest, key: str
) -> Answer:
    """Submit a rule's job under the Idempotency-Key `key` of the rule's tenant and answer with it.

    The key names the event's source (a pushed commit, a model version), so a re-delivered event
    finds the first job; replay_any_body keeps that so after the rule changes.
    """
    submitted = services.submitter.submit(tenant, request, key, replay_any_body=True)
    return answer(
        job_id=submitted.record.id, status=submitted.record.status, duplicate=submitted.replayed
    )
