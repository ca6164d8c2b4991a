"""What beat's periodic passes over ended jobs share: a resumable walk by (finished_at, id), and
a thread that runs a pass every so often.

Each pass walks the jobs that ended in a time range, in keyset pages, and keeps in Redis (under
the deployment's prefix) how far it got, so that every ended job is seen by one pass however
often beat restarts; the same range query as the sweeper's check of ended streams.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, Select, tuple_

from inferq.models import TERMINAL_STATUSES, Job
from inferq.queue import sweeper_key
from workers.context import WorkerContext

log = logging.getLogger("inferq.beat")


@dataclass(frozen=True, slots=True)
class Mark:
    """Where a walk stopped: the last job seen, by its end time then id."""

    finished_at: datetime
    id: uuid.UUID

    def dump(self) -> str:
        return f"{self.finished_at.isoformat()}|{self.id}"

    @classmethod
    def load(cls, raw: str | bytes | None) -> Mark | None:
        if not raw:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        when, _, job_id = text.partition("|")
        try:
            return cls(datetime.fromisoformat(when), uuid.UUID(job_id))
        except ValueError:
            return None


def mark_key(ctx: WorkerContext, name: str) -> str:
    return sweeper_key(ctx.registry.queue_prefix, name)


def read_mark(ctx: WorkerContext, name: str) -> Mark | None:
    return Mark.load(ctx.redis.get(mark_key(ctx, name)))


def save_mark(ctx: WorkerContext, name: str, mark: Mark) -> None:
    ctx.redis.set(mark_key(ctx, name), mark.dump())


def ended_pages(
    ctx: WorkerContext,
    query: Select[*tuple[Any, ...]],
    after: Mark | None,
    until: datetime,
    page_size: int,
    max_pages: int,
) -> Iterator[Sequence[Row[Any]]]:
    """Pages of `query` (which selects Job.id and Job.finished_at) over the jobs that ended
    after `after` and at or before `until`, oldest first, at most `max_pages` of them."""
    query = query.where(Job.status.in_(TERMINAL_STATUSES), Job.finished_at <= until).order_by(
        Job.finished_at, Job.id
    )
    for _ in range(max_pages):
        page = query
        if after is not None:
            page = page.where(tuple_(Job.finished_at, Job.id) > (after.finished_at, after.id))
        with ctx.sessions.begin() as session:
            rows = session.execute(page.limit(page_size)).all()
        if rows:
            yield rows
        if len(rows) < page_size:
            return
        after = Mark(rows[-1].finished_at, rows[-1].id)


def start_periodic(
    ctx: WorkerContext, name: str, interval: Callable[[], float], work: Callable[[], object]
) -> threading.Thread:
    """Run `work` every `interval()` seconds on a daemon thread; a failure waits for the next."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval()):
            try:
                work()
            except Exception:
                log.exception("%s failed; trying again next interval", name)

    thread = threading.Thread(target=loop, name=f"inferq-{name}", daemon=True)
    thread.start()
    return thread
