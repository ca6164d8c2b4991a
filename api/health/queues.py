"""Queue depth for /metrics: the waiting messages of each model's queue, all priorities."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from api import tasks
from inferq.metrics import QUEUE_DEPTH
from inferq.queue import PRIORITY_SEP
from inferq.registry import Registry

log = logging.getLogger("inferq.api")


def priority_lists(queue: str) -> list[str]:
    """The Redis lists behind one Celery queue (priority 0 is the bare name)."""
    return [queue] + [f"{queue}{PRIORITY_SEP}{p}" for p in range(1, 10)]


async def sample(redis: aioredis.Redis, registry: Registry) -> dict[str, int]:
    queues = sorted({spec.queue for spec in registry.all()})
    async with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            for key in priority_lists(queue):
                pipe.llen(key)
        lengths = await pipe.execute()
    return {q: sum(lengths[i * 10 : (i + 1) * 10]) for i, q in enumerate(queues)}


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
                for queue, depth in (await sample(self._redis, self._registry)).items():
                    QUEUE_DEPTH.labels(queue).set(depth)
            except Exception as exc:
                log.warning("queue depth sample failed: %s", exc)
            await asyncio.sleep(self._interval)
