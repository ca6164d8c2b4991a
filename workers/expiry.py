"""Jobs whose deadline passed before they started end `expired`.

Two places find them: a worker whose claim the deadline refused, and the sweeper, for jobs
still waiting in a queue. Either way the job's stream is closed with an `error` event.
"""

from __future__ import annotations

import uuid

from inferq import lifecycle, limits, metrics
from inferq.events import publish_end
from inferq.models import JobStatus
from inferq.queue import ENQUEUED_KEY
from workers.context import WorkerContext

BATCH = 1000


def expire_job(ctx: WorkerContext, job_id: str) -> bool:
    """Expire the job if its deadline passed before it started; False if it is not such a job."""
    with ctx.autocommit.connect() as conn:
        model = lifecycle.expire(conn, uuid.UUID(job_id))
    if model is None:
        return False
    _close(ctx, [(job_id, model)])
    return True


def expire_overdue(ctx: WorkerContext) -> int:
    """Expire the queued jobs whose deadline passed (a batch per call); how many."""
    with ctx.autocommit.connect() as conn:
        ended = lifecycle.expire_overdue(conn, BATCH)
    _close(ctx, [(str(job_id), model) for job_id, model in ended])
    return len(ended)


def _close(ctx: WorkerContext, jobs: list[tuple[str, str]]) -> None:
    if not jobs:
        return
    # Before the closing events, like a worker's end: the key's queue and reservations free.
    limits.settle_unused(ctx.redis, [job_id for job_id, _ in jobs])
    events = lifecycle.EXPIRED.closing_events()
    with ctx.redis.pipeline(transaction=False) as pipe:
        for job_id, _ in jobs:
            publish_end(ctx.publish_script, job_id, events, ctx.settings, client=pipe)
        pipe.execute()
    ctx.broker.zrem(ENQUEUED_KEY, *[job_id for job_id, _ in jobs])
    for _, model in jobs:
        metrics.JOBS_FINISHED.labels(model, JobStatus.expired.value).inc()
