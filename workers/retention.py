"""Retention, run by `inferq beat`: the texts of jobs that ended INFERQ_RETENTION_DAYS ago are
cleared (input to {}, output to null, `redacted_at` set); their counts, timings, cost, status,
error and metadata stay, so that stats and bills still add up.

Jobs are taken in the order they ended, a page at a time (one UPDATE each), at most
`MAX_PAGES` pages per pass; how far the passes got is kept in Redis, so each job is cleared
once. Without that mark (a new Redis) the next passes start again from the oldest job.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import func, select, update

from inferq.metrics import RETENTION_CLEARED
from inferq.models import Job
from workers.context import WorkerContext
from workers.passes import Mark, ended_pages, read_mark, save_mark, start_periodic

log = logging.getLogger("inferq.retention")

PAGE = 1000  # jobs per UPDATE
MAX_PAGES = 50  # per pass: a backlog is worked off over several passes
MARK = "retention_until"


def clear_old(ctx: WorkerContext) -> int:
    """One pass: clear the texts of jobs that ended before the retention period; how many."""
    with ctx.sessions.begin() as session:
        now: datetime = session.scalar(select(func.now()))
    cutoff = now - timedelta(days=ctx.settings.retention_days)
    cleared = 0
    after = read_mark(ctx, MARK)
    query = select(Job.id, Job.finished_at)
    for page in ended_pages(ctx, query, after, cutoff, PAGE, MAX_PAGES):
        ids = [row.id for row in page]
        with ctx.sessions.begin() as session:
            session.execute(
                update(Job)
                .where(Job.id.in_(ids))
                .values(input={}, output=None, redacted_at=func.now()),
                execution_options={"synchronize_session": False},
            )
        cleared += len(ids)
        save_mark(ctx, MARK, Mark(page[-1].finished_at, page[-1].id))
    if cleared:
        RETENTION_CLEARED.inc(cleared)
        log.info("retention cleared the texts of %d jobs", cleared)
    return cleared


def start_retention(ctx: WorkerContext) -> None:
    start_periodic(
        ctx, "retention", lambda: ctx.settings.retention_interval_seconds, lambda: clear_old(ctx)
    )
