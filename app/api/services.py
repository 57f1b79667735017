"""The long-lived objects one API process shares between requests.

Built once in `create_app()`: Redis clients (a sync pool for the threadpool routes, an asyncio one
for the event streams), the parsed API key table, the queue router, the submission path and the
Hub rules file. Nothing here is created per request, which keeps POST /v1/jobs cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from app.api.metrics import metrics_registry
from app.api.submission import Submitter
from app.core.config import Settings
from app.core.security import KeyRing
from app.jobs.hub_rules import HubRulesFile
from app.jobs.routing import QueueRouter
from app.jobs.store import JobStore


@dataclass
class Services:
    settings: Settings
    store: JobStore
    aredis: aioredis.Redis
    keys: KeyRing
    router: QueueRouter
    submitter: Submitter
    hub_rules: HubRulesFile | None
    metrics: CollectorRegistry

    @classmethod
    def build(cls, settings: Settings) -> Services:
        store = JobStore.from_settings(settings)
        router = QueueRouter(
            store, settings.heartbeat_fresh_seconds, settings.queue_route_cache_seconds
        )
        return cls(
            settings=settings,
            store=store,
            aredis=aioredis.Redis.from_url(
                settings.redis_url, decode_responses=True, health_check_interval=30
            ),
            keys=KeyRing(settings),
            router=router,
            submitter=Submitter(store, router, settings),
            hub_rules=(
                HubRulesFile(settings.hf_webhook_rules_file)
                if settings.hf_webhook_rules_file
                else None
            ),
            metrics=metrics_registry(store, settings.heartbeat_fresh_seconds),
        )

    async def aclose(self) -> None:
        await self.aredis.aclose()
        self.store.redis.close()
