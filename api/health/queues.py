"""Broker health for /metrics: each model's queue depth (all priorities) and the sweeper's pulse."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from api import tasks
from inferq.metrics import QUEUE_DEPTH, SWEEPER_LAST_RUN
from inferq.queue import SWEEPER_LAST_RUN_KEY, priority_lists, sweeper_key
from inferq.registry import Registry

log = logging.getLogger("inferq.api")


async def sample(redis: aioredis.Redis, registry: Registry) -> dict[str, int]:
    lists = {queue: priority_lists(queue) for queue in sorted({s.queue for s in registry.all()})}
    async with redis.pipeline(transaction=False) as pipe:
        for keys in lists.values():
            for key in keys:
                pipe.llen(key)
        lengths = iter(await pipe.execute())
    return {queue: sum(next(lengths) for _ in keys) for queue, keys in lists.items()}


async def sweeper_last_run(redis: aioredis.Redis, registry: Registry) -> float | None:
    """When beat's sweeper last finished a pass for this deployment (Unix time), if ever."""
    value = await redis.get(sweeper_key(registry.queue_prefix, SWEEPER_LAST_RUN_KEY))
    return float(value) if value else None


class QueueDepthMonitor:
    def __init__(self, redis: aioredis.Redis, registry: Registry, interval: float = 5.0) -> None:
        self._redis = redis
        self._registry = registry
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inferq-queue-depth")

    async def close(self) -> None:
        await tasks.cancel(self._task)

    async def _run(self) -> None:
        while True:
            try:
                await self._sample()
            except Exception as exc:
                log.warning("queue depth sample failed: %s", exc)
            await asyncio.sleep(self._interval)

    async def _sample(self) -> None:
        for queue, depth in (await sample(self._redis, self._registry)).items():
            QUEUE_DEPTH.labels(queue).set(depth)
        last_run = await sweeper_last_run(self._redis, self._registry)
        if last_run is not None:
            SWEEPER_LAST_RUN.set(last_run)
