"""Job state in Redis: records, per-job event streams, quotas, idempotency keys, leases, heartbeats.

Every state change is one Lua script, so the API and any number of workers can race without
losing an update: a job is created together with its quota slot, its tenant index entry and its
first event; a transition checks the current status and moves the gauges in the same step.

Keys (prefix `fapm:`):
  job:{id}              hash: tenant, status, queue, kind, spec, labels, progress, result, ...
                        (no kind: a record from before evaluation jobs, so "prune")
  job:{id}:events       stream of `state` and `progress` events (SSE replays it)
  job:{id}:report       the full pruning report (JSON)
  job:{id}:webhook      the webhook's signing secret: never part of the record
                        (it and the record's webhook_url are sealed with FAPM_SECRETS_KEYS when
                        that is set: app/core/sealing.py)
  lease:{id}            the worker token that may run the job now (expires if the worker dies)
  tenant:{t}:jobs       zset of job ids by creation time (listing, newest first)
  tenant:{t}:active     set of queued and running job ids (quota)
  idem:{t}:{key}        {fingerprint, job_id} for Idempotency-Key
  pending-enqueue       zset of jobs written but not yet handed to Celery (swept by workers)
  running               zset of jobs a worker took, by when (see "worker bookkeeping" below)
  requeued              zset of jobs the sweeper re-enqueued whose message no worker took yet
  requeue-claim:{id}    a sweeper re-enqueueing the job now (expires: a dead sweeper's lapses)
  webhooks-owed         zset of finished jobs whose webhook has not ended (delivered or given
                        up), by when its delivery should have shown progress (ms)
  webhook-attempt:{id}:{n}  a delivery making attempt n of the job's webhook now (expires: a
                        dead one's lapses), so a second delivery chain never POSTs it too
  workers               zset of worker hostnames by last heartbeat; worker:{host} its details
  stats                 hash of gauges and counters for /metrics
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import redis

from app.core.sealing import Sealer, UnsealError
from app.jobs.records import ACTIVE_STATUSES, REDACTED, TERMINAL_STATUSES, JobRecord
from worker.io import strict_json

if TYPE_CHECKING:
    from app.core.config import Settings

log = logging.getLogger(__name__)

PREFIX = "fapm:"
EVENTS_MAXLEN = 10_000
# Prometheus histogram buckets for job duration, in seconds.
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def new_job_id() -> str:
    """Sortable by creation time (hex milliseconds) and unguessable (80 random bits)."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


# The index scores a job by when it was written, a moment after its id took its time: a scan
# from a cursor's time reaches this much later, so no job with a smaller id is missed.
CURSOR_SCORE_SLACK_MS = 60_000


def _cursor_max_score(cursor: str) -> str:
    """The highest index score a job listed after an unknown cursor can have. An id's first 12
    hex digits are its millisecond; a shorter cursor is padded with f (any id below it is
    below that), and one that is not hex bounds nothing."""
    try:
        cursor_ms = int(cursor[:12].ljust(12, "f"), 16)
    except ValueError:
        return "+inf"
    return str(cursor_ms + CURSOR_SCORE_SLACK_MS)


def _key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


def job_key(job_id: str) -> str:
    return _key("job", job_id)


def events_key(job_id: str) -> str:
    return _key("job", job_id, "events")


# KEYS: job, active, tenant_jobs, events, stats, pending, idem ('' for none)
# ARGV: id, cap, created_ms, idem_value, idem_ttl, state_event_json, field, value, field, value...
_CREATE = """
if KEYS[7] ~= '' then
  local existing = redis.call('GET', KEYS[7])
  if existing then return {'idempotent', existing} end
end
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[2]) then return {'quota'} end
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[6], ARGV[3], ARGV[1])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '10000', '*', 'event', 'state', 'data', ARGV[6])
redis.call('HINCRBY', KEYS[5], 'state:queued', 1)
if KEYS[7] ~= '' then redis.call('SET', KEYS[7], ARGV[4], 'EX', ARGV[5]) end
return {'created'}
"""

# Move a job between statuses. KEYS: job, active, events, stats, lease, webhooks-owed
# ARGV: allowed-from (comma list), to, id, lease token ('' = no lease check), event data json,
#       now_ms, field, value, ...
# Returns {'ok', old} or {'refused', current} or {'lost'} (the lease belongs to someone else).
# A job that ends with a webhook owes it from the same step (see owed_webhooks_before).
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {'missing'} end
if ARGV[4] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[4] then return {'lost'} end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do if s == current then allowed = true end end
if not allowed then return {'refused', current} end
local fields = {'status', ARGV[2]}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
if current ~= ARGV[2] then
  redis.call('HINCRBY', KEYS[4], 'state:' .. current, -1)
  redis.call('HINCRBY', KEYS[4], 'state:' .. ARGV[2], 1)
end
if ARGV[2] == 'succeeded' or ARGV[2] == 'failed' or ARGV[2] == 'cancelled' then
  redis.call('SREM', KEYS[2], ARGV[3])
  redis.call('HINCRBY', KEYS[4], 'finished:' .. ARGV[2], 1)
  if ARGV[4] ~= '' then redis.call('DEL', KEYS[5]) end
  if redis.call('HEXISTS', KEYS[1], 'webhook_url') == 1 then
    redis.call('ZADD', KEYS[6], 'NX', ARGV[6], ARGV[3])
  end
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '10000', '*', 'event', 'state', 'data', ARGV[5])
return {'ok', current}
"""

# A worker takes a job. KEYS: job, events, stats, lease. ARGV: token, lease_ms, now_iso, event json
# Returns {'run', attempts}, {'skip', status} for a finished job, {'busy'} if another lease holds it.
_START = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {'missing'} end
if current ~= 'queued' and current ~= 'running' then return {'skip', current} end
local holder = redis.call('GET', KEYS[4])
if holder and holder ~= ARGV[1] then return {'busy'} end
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[2])
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if current == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[3])
  redis.call('HINCRBY', KEYS[3], 'state:queued', -1)
  redis.call('HINCRBY', KEYS[3], 'state:running', 1)
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', '10000', '*', 'event', 'state', 'data', ARGV[4])
return {'run', attempts}
"""

# KEYS: lease. ARGV: token, lease_ms. 1 if renewed, 0 if the lease is no longer ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Progress from the lease holder. KEYS: job, events, lease. ARGV: token, progress json.
# The fraction never goes down, also across a re-delivered run. Returns the stored fraction.
_PROGRESS = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
local p = cjson.decode(ARGV[2])
local old = tonumber(redis.call('HGET', KEYS[1], 'fraction') or '0')
if p.fraction < old then p.fraction = old end
local encoded = cjson.encode(p)
redis.call('HSET', KEYS[1], 'progress', encoded, 'fraction', tostring(p.fraction))
redis.call('XADD', KEYS[2], 'MAXLEN', '~', '10000', '*', 'event', 'progress', 'data', encoded)
return tostring(p.fraction)
"""

# Cancel. KEYS: job, active, events, stats, webhooks-owed. ARGV: id, now_iso, event json for a
# queued job, event json for a running one, now_ms.
# Returns {'cancelled'|'requested'|'finished', status}.
_CANCEL = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {'missing'} end
if current == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2],
    'error', cjson.encode({code='cancelled', message='cancelled before it started'}))
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('HINCRBY', KEYS[4], 'state:queued', -1)
  redis.call('HINCRBY', KEYS[4], 'state:cancelled', 1)
  redis.call('HINCRBY', KEYS[4], 'finished:cancelled', 1)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', '10000', '*', 'event', 'state', 'data', ARGV[3])
  if redis.call('HEXISTS', KEYS[1], 'webhook_url') == 1 then
    redis.call('ZADD', KEYS[5], 'NX', ARGV[5], ARGV[1])
  end
  return {'cancelled', 'cancelled'}
end
if current == 'running' then
  if redis.call('HGET', KEYS[1], 'cancel_requested') ~= '1' then
    redis.call('HSET', KEYS[1], 'cancel_requested', '1')
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', '10000', '*', 'event', 'state', 'data', ARGV[4])
  end
  return {'requested', current}
end
return {'finished', current}
"""

# Orphans to re-enqueue. KEYS: running, requeued. ARGV: cutoff (unix s), now, claim_ms, prefix,
# requeued-before (unix s: an older re-enqueue no longer holds the job back).
# A job indexed running before the cutoff, still active, with no lease, not already re-enqueued
# and not being re-enqueued by another sweeper (requeue-claim:{id}, expiring) is claimed and
# returned with its queue; a finished one leaves the index. Returns {id, queue, id, queue, ...}.
_CLAIM_ORPHANS = """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])) do
  local job = redis.call('HMGET', ARGV[4] .. 'job:' .. id, 'status', 'queue')
  local requeued = redis.call('ZSCORE', KEYS[2], id)
  if job[1] ~= 'queued' and job[1] ~= 'running' then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  elseif redis.call('EXISTS', ARGV[4] .. 'lease:' .. id) == 0
      and (not requeued or tonumber(requeued) < tonumber(ARGV[5]))
      and redis.call('SET', ARGV[4] .. 'requeue-claim:' .. id, '1', 'NX', 'PX', ARGV[3]) then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id)  -- the claim's stamp, see _MARK_REQUEUED
    out[#out + 1] = id
    out[#out + 1] = job[2]
  end
end
return out
"""

# A claimed orphan's message is sent. KEYS: running, requeued. ARGV: id, claim stamp, now.
# Marked only if no worker has noted the job since the claim (its score is still the stamp): one
# that took the message already must not be left marked.
_MARK_REQUEUED = """
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '-1') == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
end
"""

# Owed webhooks to queue. KEYS: webhooks-owed. ARGV: cutoff_ms, now_ms.
# Returns the ids owed since before the cutoff and re-stamps them to now, so another sweeper
# (or this one, if it dies before queueing them) takes them again only after the same grace.
_CLAIM_OWED_WEBHOOKS = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id) end
return ids
"""

# A delivery claims the next attempt of a job's webhook before POSTing it.
# KEYS: webhook-attempt:{id}:{n}, job, webhooks-owed. ARGV: id, n, claim_ms, expected_by_ms.
# Claimed only if attempt n is the next one (n - 1 attempts recorded: a chain that read the record
# before another recorded attempt n does not make it again) and no other delivery holds it; the
# owed stamp then moves to when this attempt should be recorded, so the sweeper re-queues the
# delivery only once the claim of a delivery that died mid-POST has lapsed. Returns 1 or 0.
_CLAIM_WEBHOOK_ATTEMPT = """
local recorded = #cjson.decode(redis.call('HGET', KEYS[2], 'webhook_deliveries') or '[]')
if recorded ~= tonumber(ARGV[2]) - 1 then return 0 end
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[3], 'XX', ARGV[4], ARGV[1])
return 1
"""

# The owed webhook's delivery is queued or scheduled. KEYS: webhooks-owed, job.
# ARGV: id, by_ms, dispatched ('1' also notes the first enqueue, on a record that exists only:
# an HSET would otherwise create a stray hash).
_WEBHOOK_EXPECTED_BY = """
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'webhook_dispatched', '1')
end
"""


@dataclass(frozen=True)
class CreateOutcome:
    """`created` (job_id is new), `idempotent` (an earlier job with the same key: job_id,
    fingerprint), or `quota` (the tenant has too many active jobs)."""

    kind: str
    job_id: str | None = None
    fingerprint: str | None = None


@dataclass(frozen=True)
class Orphan:
    """A running job with no lease, claimed by a sweeper at `claimed_at` (unix s)."""

    job_id: str
    queue: str
    claimed_at: float


@dataclass(frozen=True)
class Lease:
    job_id: str
    token: str
    attempt: int


def _dump(value: object) -> str:
    # Strict JSON: a NaN in a report or result is stored as null, never as `NaN`.
    return strict_json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


class JobStore:
    """Typed access to the Redis keys above; one instance per process is enough (thread-safe)."""

    def __init__(
        self,
        client: redis.Redis,
        job_ttl_seconds: int | None = None,
        sealer: Sealer | None = None,
    ) -> None:
        self.redis = client
        # Finished jobs (record, events, report, webhook secret) expire this long after the end.
        self.job_ttl_seconds = job_ttl_seconds
        # Seals the webhook URL and secret written, opens those read (no keys: stored in clear).
        self.sealer = sealer or Sealer()
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)
        self._start = client.register_script(_START)
        self._renew = client.register_script(_RENEW)
        self._progress = client.register_script(_PROGRESS)
        self._cancel = client.register_script(_CANCEL)
        self._claim_orphans = client.register_script(_CLAIM_ORPHANS)
        self._claim_owed_webhooks = client.register_script(_CLAIM_OWED_WEBHOOKS)
        self._mark_requeued = client.register_script(_MARK_REQUEUED)
        self._claim_webhook_attempt = client.register_script(_CLAIM_WEBHOOK_ATTEMPT)
        self._webhook_expected_by = client.register_script(_WEBHOOK_EXPECTED_BY)

    @classmethod
    def from_url(
        cls, url: str, job_ttl_seconds: int | None = None, sealer: Sealer | None = None
    ) -> JobStore:
        client = redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)
        return cls(client, job_ttl_seconds, sealer)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        """The store of a service process (API or worker): its Redis, retention and keys."""
        keys = settings.secrets_keys
        sealer = Sealer.from_setting(keys.get_secret_value() if keys else None)
        if not sealer.enabled:  # said by the API and by each worker process, as they start
            log.warning(
                "FAPM_SECRETS_KEYS is not set: jobs' webhook URLs (their tokens) and signing "
                "secrets are stored in clear in Redis and its AOF (README: Settings that matter)"
            )
        return cls.from_url(settings.redis_url, settings.job_ttl_seconds, sealer)

    def _expire_finished(self, job_id: str) -> None:
        """Start the retention clock of a finished job's keys (its tenant index entry is
        dropped by `list` once the record is gone)."""
        if not self.job_ttl_seconds:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for key in (
                job_key(job_id),
                events_key(job_id),
                _key("job", job_id, "report"),
                _key("job", job_id, "webhook"),
            ):
                pipe.expire(key, self.job_ttl_seconds)
            pipe.execute()

    # -- creation -------------------------------------------------------------------------------

    def create(
        self,
        *,
        job_id: str,
        tenant: str,
        queue: str,
        spec_json: dict,
        labels: dict[str, str],
        webhook_url: str | None,
        webhook_secret: str | None,
        max_active: int,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        idempotency_ttl: int = 86400,
        kind: str = "prune",
    ) -> CreateOutcome:
        """Write a new queued job (before it is enqueued), unless the tenant is over quota or
        the idempotency key already names a job. `kind` says which spec `spec_json` is."""
        created = now_iso()
        created_ms = int(time.time() * 1000)
        fields = {
            "id": job_id,
            "tenant": tenant,
            "status": "queued",
            "queue": queue,
            "kind": kind,
            "spec": _dump(spec_json),
            "labels": _dump(labels),
            "created_at": created,
            "created_ms": str(created_ms),
            "attempts": "0",
            "cancel_requested": "0",
            "fraction": "0",
        }
        if webhook_url:
            fields["webhook_url"] = self.sealer.seal(webhook_url)
            fields["webhook_signed"] = "1" if webhook_secret else "0"
            fields["webhook_deliveries"] = "[]"
        idem_key = _key("idem", tenant, idempotency_key) if idempotency_key else ""
        idem_value = _dump({"fingerprint": fingerprint, "job_id": job_id})
        event = _dump({"status": "queued", "at": created})
        flat = [item for pair in fields.items() for item in pair]
        if webhook_secret:
            # Written first so a worker never sees a signed webhook without its secret.
            self.redis.set(_key("job", job_id, "webhook"), self.sealer.seal(webhook_secret))
        reply = self._create(
            keys=[
                job_key(job_id),
                _key("tenant", tenant, "active"),
                _key("tenant", tenant, "jobs"),
                events_key(job_id),
                _key("stats"),
                _key("pending-enqueue"),
                idem_key,
            ],
            args=[
                job_id,
                max_active,
                created_ms,
                idem_value,
                idempotency_ttl,
                event,
                *flat,
            ],
        )
        if reply[0] == "idempotent":
            if webhook_secret:
                self.redis.delete(_key("job", job_id, "webhook"))
            earlier = json.loads(reply[1])
            return CreateOutcome("idempotent", earlier["job_id"], earlier["fingerprint"])
        if reply[0] == "quota":
            if webhook_secret:
                self.redis.delete(_key("job", job_id, "webhook"))
            return CreateOutcome("quota")
        return CreateOutcome("created", job_id)

    def mark_enqueued(self, job_id: str) -> None:
        """The task is with Celery now; the sweeper need not re-send it."""
        self.redis.zrem(_key("pending-enqueue"), job_id)

    def is_enqueued(self, job_id: str) -> bool:
        return self.redis.zscore(_key("pending-enqueue"), job_id) is None

    def unenqueued_before(self, cutoff_ms: int) -> list[tuple[str, str]]:
        """(job id, queue) of jobs written before `cutoff_ms` whose enqueue never happened."""
        ids = self.redis.zrangebyscore(_key("pending-enqueue"), "-inf", cutoff_ms)
        out = []
        for job_id in ids:
            status, queue = self.redis.hmget(job_key(job_id), "status", "queue")
            if status == "queued":
                out.append((job_id, queue))
            else:
                self.mark_enqueued(job_id)
        return out

    # -- reading --------------------------------------------------------------------------------

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job's record; None if it does not exist or belongs to another tenant."""
        fields = self.redis.hgetall(job_key(job_id))
        if not fields or (tenant is not None and fields.get("tenant") != tenant):
            return None
        return record_from_fields(fields, self.sealer)

    def tenant_of(self, job_id: str) -> str | None:
        return self.redis.hget(job_key(job_id), "tenant")

    def list(
        self,
        tenant: str,
        *,
        status: str | None = None,
        label: tuple[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
        kind: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """The tenant's jobs, newest first, filtered; returns (page, next cursor or None).

        The cursor is the last returned job id (ids sort by creation time), so pages stay stable
        while new jobs arrive.
        """
        index = _key("tenant", tenant, "jobs")
        max_score: str = "+inf"
        known_cursor = False
        if cursor:
            score = self.redis.zscore(index, cursor)
            # A cursor whose job expired (its index entry dropped) still marks a place: ids sort
            # by creation time, so the page goes on with the ids below it, and the scan starts
            # at the cursor's own time instead of at the newest job (a forged cursor must not
            # make every listing read all of a tenant's jobs).
            known_cursor = score is not None
            max_score = str(int(score)) if known_cursor else _cursor_max_score(cursor)
        page: list[JobRecord] = []
        expired: list[str] = []  # removed only after the scan: offsets must not shift
        offset = 0
        batch = max(limit * 2, 100)
        passed_cursor = not known_cursor
        try:
            while len(page) < limit:
                ids = self.redis.zrevrangebyscore(index, max_score, "-inf", start=offset, num=batch)
                if not ids:
                    return page, None
                offset += len(ids)
                # Only the ids past the cursor are read.
                wanted = []
                for job_id in ids:
                    if not passed_cursor:
                        passed_cursor = job_id == cursor
                    elif not (cursor and not known_cursor and job_id >= cursor):
                        wanted.append(job_id)
                if not wanted:
                    continue
                with self.redis.pipeline(transaction=False) as pipe:
                    for job_id in wanted:
                        pipe.hgetall(job_key(job_id))
                    rows = pipe.execute()
                for job_id, fields in zip(wanted, rows, strict=True):
                    if not fields:
                        expired.append(job_id)  # the record expired: drop its index entry after
                        continue
                    if status and fields.get("status") != status:
                        continue
                    if kind and (fields.get("kind") or "prune") != kind:
                        continue
                    if label and json.loads(fields.get("labels", "{}")).get(label[0]) != label[1]:
                        continue
                    page.append(record_from_fields(fields, self.sealer))
                    if len(page) == limit:
                        return page, job_id
            return page, None
        finally:
            if expired:
                self.redis.zrem(index, *expired)

    def report(self, job_id: str) -> dict | None:
        raw = self.redis.get(_key("job", job_id, "report"))
        return json.loads(raw) if raw else None

    def webhook_secret(self, job_id: str) -> str | None:
        """The signing secret, unsealed; UnsealError if it was sealed with a key not held."""
        stored = self.redis.get(_key("job", job_id, "webhook"))
        return self.sealer.unseal(stored) if stored is not None else None

    def events(
        self, job_id: str, after: str = "0-0", count: int = 500
    ) -> list[tuple[str, str, str]]:
        """(event id, event type, data json) after `after`, oldest first."""
        entries = self.redis.xrange(events_key(job_id), min=f"({after}", count=count)
        return [(entry_id, f["event"], f["data"]) for entry_id, f in entries]

    def active_count(self, tenant: str) -> int:
        return self.redis.scard(_key("tenant", tenant, "active"))

    # -- changes from the API -------------------------------------------------------------------

    def fail(self, job_id: str, code: str, message: str) -> bool:
        """Fail a queued or running job outright (e.g. it could not be enqueued)."""
        return self.finish(job_id, "failed", error={"code": code, "message": message})

    def request_cancel(self, job_id: str) -> str:
        """'cancelled' (it was queued: it never starts), 'requested' (running: it stops at the
        next tensor), 'finished' (too late) or 'missing'."""
        at = now_iso()
        reply = self._cancel(
            keys=[
                job_key(job_id),
                _key("tenant", self.tenant_of(job_id) or "", "active"),
                events_key(job_id),
                _key("stats"),
                _key("webhooks-owed"),
            ],
            args=[
                job_id,
                at,
                _dump(
                    {
                        "status": "cancelled",
                        "at": at,
                        "error": {"code": "cancelled", "message": "cancelled before it started"},
                    }
                ),
                _dump({"status": "running", "at": at, "cancel_requested": True}),
                int(time.time() * 1000),
            ],
        )
        if reply[0] == "cancelled":
            self._expire_finished(job_id)
        return reply[0]

    # -- changes from the worker ----------------------------------------------------------------

    def start(self, job_id: str, lease_seconds: float) -> Lease | str:
        """Take the job's lease and mark it running. Returns a Lease, or why not: 'busy'
        (another worker holds it), 'missing', or the terminal status of a finished job."""
        token = secrets.token_hex(16)
        at = now_iso()
        reply = self._start(
            keys=[job_key(job_id), events_key(job_id), _key("stats"), _key("lease", job_id)],
            args=[token, int(lease_seconds * 1000), at, _dump({"status": "running", "at": at})],
        )
        if reply[0] == "run":
            return Lease(job_id, token, int(reply[1]))
        return reply[1] if reply[0] == "skip" else reply[0]

    def renew(self, lease: Lease, lease_seconds: float) -> bool:
        """Extend the lease; False if it was lost (expired and taken by another worker)."""
        return bool(
            self._renew(
                keys=[_key("lease", lease.job_id)], args=[lease.token, int(lease_seconds * 1000)]
            )
        )

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(job_key(job_id), "cancel_requested") == "1"

    def progress(self, lease: Lease, progress: dict) -> float | None:
        """Record progress (a JobProgress dict); returns the stored, monotone fraction."""
        reply = self._progress(
            keys=[job_key(lease.job_id), events_key(lease.job_id), _key("lease", lease.job_id)],
            args=[lease.token, _dump(progress)],
        )
        value = float(reply)
        return None if value < 0 else value

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        lease: Lease | None = None,
        result: dict | None = None,
        error: dict | None = None,
        report: dict | None = None,
        progress: dict | None = None,
    ) -> bool:
        """Move the job to a terminal status. With a lease, only while the lease is ours.
        Returns False if the job had already finished (or the lease was lost)."""
        assert status in TERMINAL_STATUSES
        at = now_iso()
        fields: dict[str, str] = {"finished_at": at}
        event: dict = {"status": status, "at": at}
        if result is not None:
            fields["result"] = _dump(result)
            event["result"] = result
        if error is not None:
            fields["error"] = _dump(error)
            event["error"] = error
        if progress is not None:
            fields["progress"] = _dump(progress)
            fields["fraction"] = str(progress.get("fraction", 0))
        if report is not None:
            self.redis.set(_key("job", job_id, "report"), _dump(report))
        reply = self._transition(
            keys=[
                job_key(job_id),
                _key("tenant", self.tenant_of(job_id) or "", "active"),
                events_key(job_id),
                _key("stats"),
                _key("lease", job_id),
                _key("webhooks-owed"),
            ],
            args=[
                ",".join(ACTIVE_STATUSES),
                status,
                job_id,
                lease.token if lease else "",
                _dump(event),
                int(time.time() * 1000),
                *[item for pair in fields.items() for item in pair],
            ],
        )
        if reply[0] == "ok":
            self._expire_finished(job_id)
        return reply[0] == "ok"

    def observe_duration(self, seconds: float, bytes_processed: int) -> None:
        """Feed the /metrics job-duration histogram and bytes counter."""
        with self.redis.pipeline(transaction=False) as pipe:
            stats = _key("stats")
            for bound in DURATION_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(stats, f"duration_le:{bound}", 1)
            pipe.hincrby(stats, "duration_count", 1)
            pipe.hincrbyfloat(stats, "duration_sum", seconds)
            pipe.hincrby(stats, "bytes_processed", bytes_processed)
            pipe.execute()

    def record_webhook_delivery(self, job_id: str, delivery: dict) -> None:
        """Append one delivery attempt (WebhookDelivery dict) to the job record."""
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(job_key(job_id))
                    deliveries = json.loads(
                        pipe.hget(job_key(job_id), "webhook_deliveries") or "[]"
                    )
                    deliveries.append(delivery)
                    pipe.multi()
                    pipe.hset(job_key(job_id), "webhook_deliveries", _dump(deliveries))
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    # -- workers --------------------------------------------------------------------------------

    def heartbeat(self, hostname: str, queues: list[str], gpu: bool, ttl: float) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(_key("workers"), {hostname: time.time()})
            pipe.set(
                _key("worker", hostname),
                _dump({"queues": queues, "gpu": gpu, "at": now_iso()}),
                px=int(ttl * 1000),
            )
            pipe.execute()

    def fresh_workers(self, max_age: float) -> dict[str, dict]:
        """hostname -> {queues, gpu, at} of workers seen within `max_age` seconds."""
        hosts = self.redis.zrangebyscore(_key("workers"), time.time() - max_age, "+inf")
        if not hosts:
            return {}
        infos = self.redis.mget([_key("worker", h) for h in hosts])
        return {h: json.loads(i) for h, i in zip(hosts, infos, strict=True) if i}

    def stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.redis.hgetall(_key("stats")).items()}

    # -- worker bookkeeping (added with the worker) ----------------------------------------------
    # running              zset of jobs a worker took, by when it was last checked: a job whose
    #                      worker died keeps status running with no lease, and the heartbeat
    #                      thread re-enqueues it at once instead of after the visibility timeout.
    # requeued             zset of jobs re-enqueued that way whose message no worker took yet:
    #                      the sweeper sends one message per job and waits for it to be taken
    #                      (note_running clears the entry), however long the queue is.

    def note_running(self, job_id: str) -> None:
        """Index a job a worker is about to start (before `start`, so no window is missed); a
        re-enqueued job's message has now been taken."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(_key("running"), {job_id: time.time()})
            pipe.zrem(_key("requeued"), job_id)
            pipe.execute()

    def forget_running(self, job_id: str) -> None:
        self.redis.zrem(_key("running"), job_id)

    def noted_running_at(self, job_id: str) -> float | None:
        """When a worker last took the job (or the sweeper last re-enqueued it), unix seconds."""
        return self.redis.zscore(_key("running"), job_id)

    def claim_orphans(
        self, cutoff: float, claim_seconds: float, requeue_hold_seconds: float
    ) -> list[Orphan]:
        """Active jobs indexed before `cutoff` (unix s) that nobody holds a lease on (their
        worker died) and that were not re-enqueued in the last `requeue_hold_seconds` (a
        re-enqueued message that was itself lost, e.g. with a Redis that kept no AOF, is sent
        again after that long, as Celery's visibility timeout would). Each is claimed for
        `claim_seconds`, so concurrent sweepers re-enqueue it once; call `mark_requeued` once
        its message is sent (if the sweeper dies before, the claim lapses and the job comes
        back)."""
        now = time.time()
        reply = self._claim_orphans(
            keys=[_key("running"), _key("requeued")],
            args=[cutoff, repr(now), int(claim_seconds * 1000), PREFIX, now - requeue_hold_seconds],
        )
        pairs = zip(reply[::2], reply[1::2], strict=True)
        return [Orphan(job_id, queue, now) for job_id, queue in pairs]

    def mark_requeued(self, orphan: Orphan) -> None:
        """A re-enqueued job's message is on its queue: no other until a worker takes it (unless
        one has taken it already)."""
        self._mark_requeued(
            keys=[_key("running"), _key("requeued")],
            args=[orphan.job_id, repr(orphan.claimed_at), time.time()],
        )

    def is_requeued(self, job_id: str) -> bool:
        return self.redis.zscore(_key("requeued"), job_id) is not None

    def job_states(self, job_ids: list[str]) -> dict[str, tuple[str | None, bool, float | None]]:
        """job id -> (status or None if no record, leased, noted_running_at) in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(job_key(job_id), "status")
                pipe.exists(_key("lease", job_id))
                pipe.zscore(_key("running"), job_id)
            replies = pipe.execute()
        return {
            job_id: (replies[3 * i], bool(replies[3 * i + 1]), replies[3 * i + 2])
            for i, job_id in enumerate(job_ids)
        }

    # webhooks-owed: a job that ends with a webhook is added by the same script that ends it
    # (finish, request_cancel), stamped with its end, and stays until its delivery task ends
    # (delivered, refused with 410, or given up: webhook_settled). Each step of the delivery
    # moves the stamp to when the next step is due at the latest (webhook_expected_by: the
    # enqueue, now + the webhook timeout; each retry, its ETA + the timeout). A worker that dies
    # anywhere in between (before the enqueue, mid-POST, holding a retry's countdown message,
    # which Celery keeps unacknowledged until the visibility timeout) leaves a stamp that goes
    # stale, and the heartbeat sweeper queues the delivery again a lease later
    # (owed_webhooks_before); the delivery task continues the schedule from the record.

    def owed_webhooks_before(self, cutoff_ms: int) -> list[str]:
        """Jobs whose webhook's stamp is older than `cutoff_ms`: their delivery is lost or was
        never queued. Each returned one is re-stamped to now: it comes back only if it is still
        owed a grace later (at least once, and once per grace across all sweepers)."""
        return self._claim_owed_webhooks(
            keys=[_key("webhooks-owed")], args=[cutoff_ms, int(time.time() * 1000)]
        )

    def webhook_dispatched(self, job_id: str) -> bool:
        """Whether the end-of-job webhook was handed to the delivery queue (at least once)."""
        return self.redis.hget(job_key(job_id), "webhook_dispatched") == "1"

    def webhook_expected_by(self, job_id: str, by: float, *, dispatched: bool = False) -> None:
        """The owed webhook's delivery is queued or scheduled and should show progress (an
        attempt recorded, or its end) by `by` (unix s). Only moves the stamp of a webhook still
        owed (one that ended meanwhile stays ended); `dispatched` also notes the first enqueue."""
        self._webhook_expected_by(
            keys=[_key("webhooks-owed"), job_key(job_id)],
            args=[job_id, int(by * 1000), "1" if dispatched else "0"],
        )

    def claim_webhook_attempt(
        self, job_id: str, attempt: int, claim_seconds: float, expected_by: float
    ) -> bool:
        """Claim attempt `attempt` of the job's webhook for `claim_seconds` before POSTing it:
        False if another delivery holds it or it is not the next attempt (one recorded since
        this delivery read the record), and this delivery must not make it. On a claim, the
        owed stamp moves to `expected_by` (unix s), when the attempt should be recorded."""
        return bool(
            self._claim_webhook_attempt(
                keys=[
                    _key("webhook-attempt", job_id, str(attempt)),
                    job_key(job_id),
                    _key("webhooks-owed"),
                ],
                args=[job_id, attempt, int(claim_seconds * 1000), int(expected_by * 1000)],
            )
        )

    def webhook_settled(self, job_id: str) -> None:
        """The webhook's delivery has ended (delivered, refused, given up, or there is none):
        no longer owed."""
        self.redis.zrem(_key("webhooks-owed"), job_id)

    def forget_worker(self, hostname: str) -> None:
        """A worker shutting down: routing and /readyz stop counting it at once, not after
        heartbeat_fresh_seconds."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(_key("workers"), hostname)
            pipe.delete(_key("worker", hostname))
            pipe.execute()


def record_from_fields(fields: dict[str, str], sealer: Sealer | None = None) -> JobRecord:
    """Build the public record from a job hash (the webhook secret is never in the hash). A
    webhook URL sealed with a key `sealer` does not hold still reads (any record must, or one
    bad record fails a listing): it shows as REDACTED and cannot be delivered to."""
    webhook = None
    unsealable = None
    if fields.get("webhook_url"):
        try:
            url = (sealer or Sealer()).unseal(fields["webhook_url"])
        except UnsealError as exc:
            url, unsealable = REDACTED, str(exc)
        webhook = {
            "url": url,
            "signed": fields.get("webhook_signed") == "1",
            "deliveries": json.loads(fields.get("webhook_deliveries") or "[]"),
        }
    record = JobRecord.model_validate(
        {
            "id": fields["id"],
            "status": fields["status"],
            "queue": fields["queue"],
            "kind": fields.get("kind") or "prune",
            "spec": json.loads(fields["spec"]),
            "labels": json.loads(fields.get("labels") or "{}"),
            "progress": json.loads(fields["progress"]) if fields.get("progress") else {},
            "result": json.loads(fields["result"]) if fields.get("result") else None,
            "error": json.loads(fields["error"]) if fields.get("error") else None,
            "webhook": webhook,
            "cancel_requested": fields.get("cancel_requested") == "1",
            "attempts": int(fields.get("attempts") or 0),
            "created_at": fields["created_at"],
            "started_at": fields.get("started_at") or None,
            "finished_at": fields.get("finished_at") or None,
        }
    )
    if unsealable is not None and record.webhook is not None:
        record.webhook.cannot_deliver(unsealable)
    return record
