"""Probes and metrics, without auth: /healthz (the process answers), /readyz (it can do useful
work: Redis answers and some worker has a fresh heartbeat), /metrics (Prometheus text)."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from app.api.deps import ServicesDep
from app.api.metrics import render
from app.core.problems import ProblemError, problem_responses

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: str = "ok"


class WorkerInfo(BaseModel):
    queues: list[str]
    gpu: bool
    at: str = Field(description="Time of its last heartbeat.")


class Readiness(BaseModel):
    status: str = "ready"
    workers: dict[str, WorkerInfo] = Field(description="Workers seen recently, by hostname.")


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: Redis answers and a worker heartbeat is fresh",
    responses=problem_responses(503),
)
def readyz(services: ServicesDep) -> Readiness:
    try:
        services.store.redis.ping()
        workers = services.store.fresh_workers(services.settings.heartbeat_fresh_seconds)
    except redis.RedisError as exc:
        raise ProblemError(
            503, "not_ready", f"Redis is not reachable: {type(exc).__name__}"
        ) from exc
    if not workers:
        raise ProblemError(
            503,
            "not_ready",
            f"No worker heartbeat in the last {services.settings.heartbeat_fresh_seconds:g} s; "
            "jobs would wait in the queue.",
        )
    return Readiness(workers={host: WorkerInfo(**info) for host, info in workers.items()})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format.",
            "content": {
                "text/plain": {
                    "example": 'fapm_jobs{state="queued"} 3.0\nfapm_queue_depth{queue="gpu"} 2.0\n'
                }
            },
        },
        **problem_responses(503),
    },
)
def metrics(services: ServicesDep) -> Response:
    return Response(render(services.metrics), media_type=CONTENT_TYPE_LATEST)
