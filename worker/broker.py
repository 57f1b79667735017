"""What the Celery broker (kombu's Redis transport) holds for fapm's jobs, as the sweeper needs it.

kombu's Redis transport keeps a queue as a Redis list: a producer LPUSHes a message, a worker
BRPOPs it from the other end, so the right end is the head of the line. A message a worker has
taken but not yet acknowledged (fapm acknowledges a job at its end) waits in the hash `unacked`
(tag -> [message, exchange, routing key]), its delivery time in the zset `unacked_index`. A worker
that dies leaves its message there until the visibility timeout (48 h) puts it back.

Two things here let the heartbeat sweeper (worker/heartbeat.py) act sooner and keep a recovered
job at the front:

- `taken_jobs` lists the run_job messages taken before a time and still unacknowledged, and
  `restore` puts one back at the head of its queue (kombu's own restore_by_tag, the visibility
  timeout's code, for one message);
- `enqueue_first` sends a new run_job message at the head of its queue.

Messages with an ETA (a Celery countdown: a `busy` retry, a webhook retry) are never listed: a
live worker holds them until they are due, and a job's `busy` retry is never its only way back
(the job is running elsewhere, and the orphan sweep covers that worker).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial

from celery import Celery
from kombu.utils.json import dumps, loads

from worker.celery_app import RUN_JOB_TASK

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TakenMessage:
    tag: str
    job_id: str
    taken_at: float  # unix seconds, by the clock of the worker that took it


class Broker:
    """One per sweeper thread (it keeps a broker connection and what it learnt of messages)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._connection = None
        # Tags of unacknowledged messages that are never a stranded job (other tasks, ETA
        # messages, finished jobs): their payload is read once, not on every sweep.
        self._ignored: set[str] = set()

    @property
    def _channel(self):
        if self._connection is None:
            self._connection = self.app.connection_for_write()
        return self._connection.default_channel

    def close(self) -> None:
        if self._connection is not None:
            self._connection.release()
            self._connection = None

    def taken_jobs(self, before: float) -> list[TakenMessage]:
        """run_job messages without an ETA, taken before `before` (unix s), unacknowledged."""
        channel = self._channel
        client = channel.client
        taken = client.zrangebyscore(channel.unacked_index_key, "-inf", before, withscores=True)
        tags = {_text(tag): score for tag, score in taken}
        self._ignored &= tags.keys()  # forget acknowledged ones
        unread = [tag for tag in tags if tag not in self._ignored]
        if not unread:
            return []
        out = []
        for tag, raw in zip(unread, client.hmget(channel.unacked_key, unread), strict=True):
            job_id = _job_of(channel, raw) if raw else None
            if job_id is None:
                self._ignored.add(tag)
            else:
                out.append(TakenMessage(tag, job_id, tags[tag]))
        return out

    def ignore(self, tag: str) -> None:
        """Never look at this message again (its job has finished)."""
        self._ignored.add(tag)

    def restore(self, tag: str) -> None:
        """Put an unacknowledged message back at the head of its queue, now (kombu does it
        atomically: a message acknowledged meanwhile is not restored)."""
        channel = self._channel
        channel.qos.restore_by_tag(tag, client=channel.client, leftmost=False)

    def enqueue_first(self, job_id: str, queue: str) -> None:
        """Send a run_job message that the next worker of `queue` takes before those waiting."""
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            # This private channel publishes at the head (RPUSH) instead of the tail (LPUSH).
            channel._put = partial(_put_at_head, channel)
            self.app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, connection=connection)


def _put_at_head(channel, queue: str, message: dict, **_: object) -> None:
    key = channel._q_for_pri(queue, channel._get_message_priority(message, reverse=False))
    with channel.conn_or_acquire() as client:
        client.rpush(key, dumps(message))


def _job_of(channel, raw: bytes) -> str | None:
    """The job id of an unacknowledged run_job message without an ETA, else None."""
    try:
        message, _exchange, _routing_key = loads(_text(raw))
        headers = message.get("headers") or {}
        if headers.get("task") != RUN_JOB_TASK or headers.get("eta"):
            return None
        body = channel.decode_body(message["body"], message["properties"].get("body_encoding"))
        args = json.loads(body)[0]  # Celery message protocol 2: [args, kwargs, embed]
        return str(args[0])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        log.warning("unreadable unacknowledged message: %s", exc)
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
