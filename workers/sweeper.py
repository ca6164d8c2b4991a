"""The sweeper (DESIGN §4): re-enqueue lost deliveries and dead workers' jobs, fail the hopeless.

It runs in the `inferq beat` process, on its own thread, so that it never waits behind
generations in a busy worker pool.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, func, select, update

from inferq.events import script_args, script_keys, terminal_events
from inferq.models import Job, JobStatus
from inferq.queue import ENQUEUED_KEY, Enqueue
from workers.context import WorkerContext

log = logging.getLogger("inferq.sweeper")

BATCH = 1000
# Marks of messages that were consumed without a claim (e.g. a job cancelled while queued)
# are dropped after this long; a job still waiting after it is merely enqueued once more.
MARK_RETENTION_SECONDS = 24 * 3600


@dataclass(frozen=True, slots=True)
class SweepReport:
    requeued_lost: int = 0
    requeued_expired: int = 0
    failed: int = 0


def _not_enqueued(ctx: WorkerContext, ids: list[str], since: list[float] | None = None) -> set[str]:
    """Ids with no enqueue mark (or, with `since`, no mark newer than the given time)."""
    if not ids:
        return set()
    scores = ctx.broker.zmscore(ENQUEUED_KEY, ids)
    floors = since or [0.0] * len(ids)
    return {
        job_id
        for job_id, score, floor in zip(ids, scores, floors, strict=True)
        if score is None or score < floor
    }


def sweep(ctx: WorkerContext) -> SweepReport:
    """One pass: fail exhausted jobs, then re-enqueue lost and expired ones."""
    settings = ctx.settings
    failed = _fail_exhausted(ctx)
    grace = func.now() - timedelta(seconds=settings.lost_enqueue_grace_seconds)
    with ctx.sessions.begin() as session:
        lost = session.execute(
            select(Job.id, Job.model, Job.priority)
            .where(Job.status == JobStatus.queued, Job.created_at < grace)
            .order_by(Job.id)
            .limit(BATCH)
        ).all()
        expired = session.execute(
            select(Job.id, Job.model, Job.priority, Job.lease_expires_at)
            .where(Job.status == JobStatus.running, Job.lease_expires_at < func.now())
            .limit(BATCH)
        ).all()
    lost_ids = _not_enqueued(ctx, [str(r.id) for r in lost])
    # A mark older than the lapsed lease belongs to an earlier delivery (a worker can take a
    # message before the API has marked it), so only a newer one means "already re-enqueued".
    expired_ids = _not_enqueued(
        ctx, [str(r.id) for r in expired], [r.lease_expires_at.timestamp() for r in expired]
    )
    wanted = lost_ids | expired_ids
    items = [
        Enqueue(str(r.id), ctx.registry.queue_of(r.model), r.priority)
        for r in [*lost, *expired]
        if str(r.id) in wanted
    ]
    if items:
        ctx.enqueuer.enqueue(ctx.broker, items)
        log.warning("re-enqueued %d jobs", len(items))
    ctx.broker.zremrangebyscore(ENQUEUED_KEY, "-inf", time.time() - MARK_RETENTION_SECONDS)
    return SweepReport(len(lost_ids), len(expired_ids), failed)


def _fail_exhausted(ctx: WorkerContext) -> int:
    """A job whose lease expired on its last allowed attempt fails with a clear error."""
    message = f"the job's worker stopped responding on each of {ctx.settings.max_attempts} attempts"
    with ctx.sessions.begin() as session:
        ids = session.scalars(
            update(Job)
            .where(
                and_(
                    Job.status == JobStatus.running,
                    Job.lease_expires_at < func.now(),
                    Job.attempts >= ctx.settings.max_attempts,
                )
            )
            .values(
                status=JobStatus.failed,
                error_type="worker_lost",
                error_message=message,
                finished_at=func.now(),
                lease_expires_at=None,
            )
            .returning(Job.id)
        ).all()
    for job_id in ids:
        events = terminal_events(JobStatus.failed.value, error=("worker_lost", message))
        ctx.publish_script(
            keys=script_keys(str(job_id)),
            args=script_args(events, ctx.settings.stream_maxlen, ctx.settings.stream_ttl_seconds),
        )
    return len(ids)


def start_sweeper(ctx: WorkerContext) -> threading.Thread:
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(ctx.settings.sweep_interval_seconds):
            try:
                sweep(ctx)
            except Exception:
                log.exception("sweep failed; trying again next interval")

    thread = threading.Thread(target=loop, name="inferq-sweeper", daemon=True)
    thread.start()
    return thread
