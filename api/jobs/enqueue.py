"""Committed jobs to the broker, each on its model's queue."""

from __future__ import annotations

import redis.asyncio as aioredis

from inferq.models import Job
from inferq.queue import Enqueue, Enqueuer
from inferq.registry import Registry


class JobQueue:
    """Hands jobs to Celery by task name, in one round trip per batch."""

    def __init__(self, registry: Registry, enqueuer: Enqueuer, broker: aioredis.Redis) -> None:
        self._registry = registry
        self._enqueuer = enqueuer
        self._broker = broker

    async def put(self, jobs: list[Job]) -> None:
        """Hand the jobs to the broker (after their rows are committed)."""
        items = [
            Enqueue(
                str(j.id),
                self._registry.queue_of(j.model),
                j.priority,
                label=f"model={j.model} tenant={j.tenant}",
            )
            for j in jobs
        ]
        await self._enqueuer.enqueue_async(self._broker, items)

    def close(self) -> None:
        self._enqueuer.close()
