"""What an API process holds: made whole at start-up, started in the lifespan, closed at the end."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from cachetools import LRUCache, TTLCache
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from api.admission import Admissions
from api.auth import KeyRing
from api.events.hub import Hub
from api.jobs.batcher import SubmitBatcher
from api.jobs.enqueue import JobQueue
from inferq.db import async_sessions, make_async_engine
from inferq.events import PUBLISH_SCRIPT
from inferq.models import Job
from inferq.queue import Enqueuer, make_producer_app
from inferq.redis_clients import async_client
from inferq.registry import Registry, registry_of
from inferq.resp import RespLink
from inferq.settings import Settings
from inferq.tokens import TokenCounter

# The API's connections carry this name in Redis's CLIENT LIST.
API_CLIENT = "inferq-api"
# How long this process remembers a job it accepted as it was then (queued): its events are
# most often read next, before the worker has written any.
FRESH_JOB_SECONDS = 10.0


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    autocommit: AsyncEngine  # the same pool, for single statements
    sessions: async_sessionmaker
    redis: aioredis.Redis
    link: RespLink  # the lean connection of the hot paths (event streams' replays, enqueues)
    publish_script: Any
    registry: Registry
    broker: aioredis.Redis  # the broker's Redis (the same client when it is one server)
    broker_link: RespLink  # the lean connection to it (the same as `link` when one server)
    queue: JobQueue
    keys: KeyRing
    hub: Hub
    batcher: SubmitBatcher
    admissions: Admissions
    job_tenants: LRUCache[uuid.UUID, str] = field(default_factory=lambda: LRUCache(100_000))
    fresh_jobs: TTLCache[uuid.UUID, Job] = field(
        default_factory=lambda: TTLCache(10_000, FRESH_JOB_SECONDS)
    )
    tokens: TokenCounter = field(default_factory=TokenCounter)  # backends' tokenizers

    @classmethod
    def create(cls, settings: Settings) -> AppState:
        """Everything the process needs; nothing runs until `start`."""
        engine = make_async_engine(settings.database_url, settings.db_pool_size)
        autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        client = async_client(settings.redis_url, settings.redis_pool_size, name=API_CLIENT)
        broker = _broker_client(settings, client)
        link = RespLink(settings.redis_url, name=API_CLIENT)
        same = settings.broker == settings.redis_url
        broker_link = link if same else RespLink(settings.broker, name=API_CLIENT)
        registry = registry_of(settings)
        queue = JobQueue(registry, Enqueuer(make_producer_app(settings)), broker_link)
        return cls(
            settings=settings,
            engine=engine,
            autocommit=autocommit,
            sessions=async_sessions(engine),
            redis=client,
            link=link,
            broker_link=broker_link,
            publish_script=client.register_script(PUBLISH_SCRIPT),
            registry=registry,
            broker=broker,
            queue=queue,
            keys=KeyRing(autocommit, settings.bootstrap_key),
            hub=Hub(settings.redis_url, settings.sse_subscribe_timeout_seconds, name=API_CLIENT),
            batcher=SubmitBatcher(autocommit, queue.put),
            admissions=Admissions(client),
        )

    async def start(self) -> None:
        await self.hub.start()
        self.batcher.start()
        self.admissions.start()

    async def close(self) -> None:
        await self.batcher.close()
        await self.admissions.close()
        await self.tokens.aclose()
        await self.hub.close()
        self.queue.close()
        if self.broker is not self.redis:
            await self.broker.aclose()
        if self.broker_link is not self.link:
            await self.broker_link.close()
        await self.link.close()
        await self.redis.aclose()
        await self.engine.dispose()


def _broker_client(settings: Settings, redis: aioredis.Redis) -> aioredis.Redis:
    if settings.broker == settings.redis_url:
        return redis
    return async_client(settings.broker, 16, name=API_CLIENT)
