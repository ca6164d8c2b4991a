"""Group commit for submits: concurrent requests share one INSERT, one commit and one publish."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from api import tasks
from api.errors import dependency_down
from inferq.models import Job

log = logging.getLogger("inferq.api")

# Hands committed jobs to the broker.
EnqueueJobs = Callable[[list[Job]], Awaitable[None]]


@dataclass(slots=True)
class _Pending:
    values: dict[str, Any]
    done: asyncio.Future[Job]


class SubmitBatcher(tasks.Coalescer[_Pending]):
    """Writes every job waiting when the previous batch ends, in one transaction, and hands
    them to the broker together."""

    def __init__(self, autocommit: AsyncEngine, enqueue: EnqueueJobs) -> None:
        super().__init__("inferq-submit-batcher")
        self._autocommit = autocommit
        self._enqueue_jobs = enqueue

    async def submit(self, values: dict[str, Any]) -> Job:
        """Commit the job and hand it to the broker; returns the stored job."""
        pending = _Pending(values, asyncio.get_running_loop().create_future())
        self._add(pending)
        return await pending.done

    async def _handle(self, batch: list[_Pending]) -> None:
        await self._write(batch)

    async def _write(self, batch: list[_Pending]) -> None:
        try:
            jobs = await self._insert([p.values for p in batch])
        except Exception as exc:
            if len(batch) > 1 and dependency_down(exc) is None:
                # Postgres refused a row, not the connection: one request's bad input must
                # not fail its neighbours. The INSERT was atomic (nothing of it is stored), so
                # each half is written again on its own, down to the refused rows alone:
                # about 2·log2(n) more INSERTs per bad row, not one per row.
                half = len(batch) // 2
                await self._write(batch[:half])
                await self._write(batch[half:])
            else:
                _fail(batch, exc)
            return
        await self._enqueue(jobs)
        for pending, job in zip(batch, jobs, strict=True):
            if not pending.done.done():
                pending.done.set_result(job)

    async def _insert(self, rows: list[dict[str, Any]]) -> list[Job]:
        # One multi-row INSERT is atomic on its own: no BEGIN/COMMIT round trips.
        async with self._autocommit.connect() as conn:
            result = await conn.execute(
                insert(Job).returning(Job.id, Job.created_at, sort_by_parameter_order=True),
                [_columns(row) for row in rows],
            )
            created = {row.id: row.created_at for row in result}
        return [_transient_job(row, created[row["id"]]) for row in rows]

    async def _enqueue(self, jobs: list[Job]) -> None:
        try:
            await self._enqueue_jobs(jobs)
        except Exception:
            # The jobs are committed: the sweeper enqueues them within seconds.
            log.exception("enqueue failed; leaving %d jobs to the sweeper", len(jobs))


def _fail(batch: list[_Pending], exc: Exception) -> None:
    for pending in batch:
        if not pending.done.done():
            pending.done.set_exception(exc)


def _columns(values: dict[str, Any]) -> dict[str, Any]:
    """ORM attribute names to column names (only `metadata_` differs)."""
    row = dict(values)
    row["metadata"] = row.pop("metadata_")
    return row


def _transient_job(values: dict[str, Any], created_at: Any) -> Job:
    return Job(**values, created_at=created_at, attempts=0, cached=False)
