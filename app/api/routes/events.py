"""GET /v1/jobs/{id}/events: Server-Sent Events from the job's Redis stream.

Each job has a stream (`fapm:job:{id}:events`) that the store appends to in the same Lua step as
every state change and progress write. The handler replays it from `Last-Event-ID` and then waits
with `XREAD BLOCK` on the asyncio Redis client, so a thousand idle streams cost a thousand parked
coroutines and sockets, not threads. Streams (not pub/sub) make the feed resumable: the SSE `id`
is the stream entry id, and a reconnecting client continues exactly after the last event it saw.

The stream closes after the terminal state event (succeeded, failed, cancelled). A finished job
replays its history and closes; a client that resumes after the terminal event gets an empty
stream that closes at once.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated

import redis
from fastapi import APIRouter, Depends, Header, Query
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.api import examples
from app.api.deps import ServicesDep, TenantDep
from app.api.routes.jobs import JOB_ID_RE, JobId, job_not_found
from app.core.problems import ProblemError, problem_responses
from app.jobs.records import TERMINAL_STATUSES
from app.jobs.store import events_key, job_key

log = logging.getLogger("app.events")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# A Redis stream entry id (ms-seq, or ms alone); ASCII digits only (`\d` would take any script's).
STREAM_ID_RE = re.compile(r"^[0-9]{1,20}(-[0-9]{1,20})?$")
READ_BATCH = 500


async def _stream_start(
    services: ServicesDep,
    tenant: TenantDep,
    job_id: JobId,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="Resume after this event id (EventSource sends it on reconnect); "
            "anything else is a 400 `invalid_last_event_id`.",
            json_schema_extra={"pattern": STREAM_ID_RE.pattern},
        ),
    ] = None,
    after: Annotated[
        str | None,
        Query(
            description="Same as Last-Event-ID, for clients that cannot set headers.",
            json_schema_extra={"pattern": STREAM_ID_RE.pattern},
        ),
    ] = None,
) -> str:
    """Check ownership before the 200 goes out (a 404 is impossible once streaming), and parse
    where to start. Returns the stream id to read after."""
    owner = (
        await services.aredis.hget(job_key(job_id), "tenant") if JOB_ID_RE.match(job_id) else None
    )
    if owner != tenant:
        raise job_not_found(job_id)
    # The 400 (not FastAPI's 422) is ours, so the pattern is documented above, checked here:
    # each one given must be an id, and the header wins.
    for given in (last_event_id, after):
        if given is not None and not STREAM_ID_RE.fullmatch(given):
            raise ProblemError(
                400,
                "invalid_last_event_id",
                "Last-Event-ID must be an event id from this stream (e.g. 1727784000000-0).",
            )
    return last_event_id or after or "0-0"


def _is_terminal(event: str, data: str) -> bool:
    if event != "state":
        return False
    try:
        return json.loads(data).get("status") in TERMINAL_STATUSES
    except (ValueError, AttributeError):
        return False


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a job: Server-Sent Events",
    description=(
        "`text/event-stream` of the job's history and then its live changes. Each event has "
        "`id:` (Redis stream entry id; send it back as `Last-Event-ID` to resume), `event:` "
        "`state` or `progress`, and `data:` one line of JSON: for `state` "
        "`{status, at, error?, result?, cancel_requested?}`, for `progress` the JobProgress "
        "object. Comment lines (`: keep-alive`) are sent while the job is quiet. The stream "
        "closes after the `state` event whose status is succeeded, failed or cancelled."
    ),
    responses={
        200: {
            "description": "The event stream.",
            "content": {"text/event-stream": {"example": examples.SSE_EXAMPLE}},
        },
        **problem_responses(400, 401, 404),
    },
)
async def job_events(
    services: ServicesDep,
    job_id: JobId,
    start: Annotated[str, Depends(_stream_start)],
) -> AsyncIterator[ServerSentEvent]:
    aredis = services.aredis
    key = events_key(job_id)
    block_ms = max(1, int(services.settings.sse_keepalive_seconds * 1000))
    last = start
    blocking = False  # the first read replays without waiting
    try:
        while True:
            reply = await aredis.xread(
                {key: last}, count=READ_BATCH, block=block_ms if blocking else None
            )
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                last = entry_id
                event, data = fields.get("event", "state"), fields.get("data", "{}")
                yield ServerSentEvent(id=entry_id, event=event, raw_data=data)
                if _is_terminal(event, data):
                    return
            if entries:
                continue
            # Nothing new: a job that ended (its terminal event lies before `last`) or expired
            # closes the stream; a live one gets a keep-alive after each quiet wait.
            status = await aredis.hget(job_key(job_id), "status")
            if status is None or status in TERMINAL_STATUSES:
                return
            if blocking:
                yield ServerSentEvent(comment="keep-alive")
            blocking = True
    except redis.RedisError as exc:
        # The client reconnects with Last-Event-ID and loses nothing.
        log.warning("events stream of job %s ended early: %s", job_id, exc)
