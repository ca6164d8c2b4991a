"""Committed jobs to the broker, each on its model's queue, at its tenant's fair priority."""

from __future__ import annotations

from inferq import fairness
from inferq.models import Job
from inferq.queue import Enqueue, Enqueuer
from inferq.registry import Registry
from inferq.resp import RespLink


class JobQueue:
    """Hands jobs to Celery by task name, in two round trips per batch on the lean connection
    to the broker: the tenants' fair-share loads, then the messages."""

    def __init__(self, registry: Registry, enqueuer: Enqueuer, broker: RespLink) -> None:
        self._registry = registry
        self._enqueuer = enqueuer
        self._broker = broker

    async def put(self, jobs: list[Job]) -> None:
        """Hand the jobs to the broker (after their rows are committed)."""
        queues = [self._registry.queue_of(j.model) for j in jobs]
        # A tenant that floods a queue yields to lighter ones (inferq.fairness).
        shifts = await fairness.shifts(
            self._broker, [(q, j.tenant) for q, j in zip(queues, jobs, strict=True)]
        )
        items = [
            Enqueue(
                str(j.id),
                queue,
                j.priority,
                label=f"model={j.model} tenant={j.tenant}",
                shift=shift,
            )
            for j, queue, shift in zip(jobs, queues, shifts, strict=True)
        ]
        await self._enqueuer.enqueue_async(self._broker, items)

    def close(self) -> None:
        self._enqueuer.close()
