"""What an API process holds: made in the lifespan, closed at shutdown."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from cachetools import LRUCache
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from api.events.hub import Hub

if TYPE_CHECKING:
    from api.jobs.batcher import SubmitBatcher
from inferq.db import async_sessions, make_async_engine
from inferq.events import PUBLISH_SCRIPT
from inferq.queue import Enqueuer, make_producer_app
from inferq.redis_clients import async_client
from inferq.registry import Registry, registry_of
from inferq.settings import Settings

# The API's connections carry this name in Redis's CLIENT LIST.
API_CLIENT = "inferq-api"


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    autocommit: AsyncEngine  # the same pool, for single statements
    sessions: async_sessionmaker
    redis: aioredis.Redis
    publish_script: Any
    registry: Registry
    enqueuer: Enqueuer
    broker: aioredis.Redis  # the broker's Redis (the same client when it is one server)
    key_cache: dict[str, Any] = field(default_factory=dict)
    # Key lookups under way, by digest: concurrent requests with one cold key share one.
    key_lookups: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    job_tenants: LRUCache[uuid.UUID, str] = field(default_factory=lambda: LRUCache(100_000))
    hub: Hub = None  # type: ignore[assignment]  # started in the lifespan
    batcher: SubmitBatcher = None  # type: ignore[assignment]  # started in the lifespan

    @classmethod
    def create(cls, settings: Settings) -> AppState:
        engine = make_async_engine(settings.database_url, settings.db_pool_size)
        client = async_client(settings.redis_url, settings.redis_pool_size, name=API_CLIENT)
        broker = (
            client
            if settings.broker == settings.redis_url
            else async_client(settings.broker, 16, name=API_CLIENT)
        )
        return cls(
            settings=settings,
            engine=engine,
            autocommit=engine.execution_options(isolation_level="AUTOCOMMIT"),
            sessions=async_sessions(engine),
            redis=client,
            publish_script=client.register_script(PUBLISH_SCRIPT),
            registry=registry_of(settings),
            enqueuer=Enqueuer(make_producer_app(settings)),
            broker=broker,
        )

    async def close(self) -> None:
        self.enqueuer.close()
        if self.broker is not self.redis:
            await self.broker.aclose()
        await self.redis.aclose()
        await self.engine.dispose()
