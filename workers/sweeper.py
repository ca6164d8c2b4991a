"""The sweeper: re-enqueue lost deliveries and dead workers' jobs, fail the
hopeless, and close the streams of ended jobs whose last event never reached Redis.

It runs in the `inferq beat` process, on its own thread, so that it never waits behind
generations in a busy worker pool. Its own state (when it last scanned the queues, up to when
it has checked ended jobs' streams, when it last completed a pass) lives in Redis, under the
deployment's prefix, so that it survives a restart of beat.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, Select, func, select, tuple_

from inferq import lifecycle, limits
from inferq.events import TERMINAL_EVENTS, Event, publish_end, stream_key
from inferq.lifecycle import Outcome
from inferq.metrics import SWEEPER_LAST_RUN
from inferq.models import TERMINAL_STATUSES, Job, JobStatus
from inferq.queue import (
    ENQUEUED_KEY,
    SWEEPER_LAST_RUN_KEY,
    UNACKED_KEY,
    Enqueue,
    priority_lists,
    sweeper_key,
    task_id_of,
)
from workers.context import WorkerContext
from workers.expiry import expire_overdue

log = logging.getLogger("inferq.sweeper")

BATCH = 1000  # rows per query, ids per Redis command
SCAN_CHUNK = 500  # stored messages per LRANGE / HSCAN round trip
# Marks of messages that were consumed without a claim (e.g. a job cancelled while queued)
# are dropped after this long; a job still waiting after it is merely enqueued once more.
MARK_RETENTION_SECONDS = 24 * 3600
QUEUES_SCANNED_KEY = "queues_scanned"  # set while a scan of the queues is not due again
STREAMS_CHECKED_KEY = "streams_checked_until"  # ended jobs up to this time are closed
# kombu's index of its unacked hash: delivery tag -> delivery time (its `unacked_index_key`).
UNACKED_INDEX_KEY = "unacked_index"


@dataclass(frozen=True, slots=True)
class SweepReport:
    requeued_lost: int = 0
    requeued_expired: int = 0
    failed: int = 0
    requeued_orphaned: int = 0  # marked as enqueued, but their message was gone
    streams_closed: int = 0


def sweep(ctx: WorkerContext) -> SweepReport:
    """One pass: fail exhausted jobs, re-enqueue lost and expired ones, close ended streams."""
    failed = _fail_exhausted(ctx)
    expire_overdue(ctx)  # before re-enqueueing: a job past its deadline must not run
    lost, orphaned = _requeue_queued(ctx)
    expired = _requeue_expired(ctx)
    closed = close_streams(ctx)
    ctx.broker.zremrangebyscore(ENQUEUED_KEY, "-inf", time.time() - MARK_RETENTION_SECONDS)
    now = time.time()
    ctx.redis.set(_key(ctx, SWEEPER_LAST_RUN_KEY), now)  # the API's /metrics reads it there
    SWEEPER_LAST_RUN.set(now)  # beat's own /metrics (INFERQ_BEAT_METRICS_PORT)
    return SweepReport(lost, expired, failed, orphaned, closed)


def _key(ctx: WorkerContext, name: str) -> str:
    return sweeper_key(ctx.registry.queue_prefix, name)


def _pages(ctx: WorkerContext, query: Select[*tuple[Any, ...]]) -> Iterator[Sequence[Row[Any]]]:
    """All rows of `query` in pages of BATCH by id (keyset), each page in a short transaction."""
    after: uuid.UUID | None = None
    while True:
        page = query if after is None else query.where(Job.id > after)
        with ctx.sessions.begin() as session:
            rows = session.execute(page.order_by(Job.id).limit(BATCH)).all()
        if rows:
            yield rows
        if len(rows) < BATCH:
            return
        after = rows[-1].id


def _marks(ctx: WorkerContext, rows: Sequence[Row[Any]]) -> list[float | None]:
    """Each job's enqueue mark (the time its message was handed to Redis), None without one."""
    marks: list[float | None] = []
    for start in range(0, len(rows), BATCH):
        ids = [str(r.id) for r in rows[start : start + BATCH]]
        marks += ctx.broker.zmscore(ENQUEUED_KEY, ids)
    return marks


def _enqueue(ctx: WorkerContext, rows: Iterable[Row[Any]], why: str) -> int:
    items = [Enqueue(str(r.id), ctx.registry.queue_of(r.model), r.priority) for r in rows]
    for start in range(0, len(items), BATCH):
        ctx.enqueuer.enqueue(ctx.broker, items[start : start + BATCH])
    if items:
        log.warning("re-enqueued %d %s jobs", len(items), why)
    return len(items)


def _requeue_queued(ctx: WorkerContext) -> tuple[int, int]:
    """Queued jobs without a mark (enqueue lost), then marked ones without a message."""
    settings = ctx.settings
    grace = func.now() - timedelta(seconds=settings.lost_enqueue_grace_seconds)
    query = select(Job.id, Job.model, Job.priority).where(
        Job.status == JobStatus.queued, Job.created_at < grace
    )
    old_mark = time.time() - settings.orphan_mark_seconds
    lost = 0
    suspects: list[Row[Any]] = []
    scan: bool | None = None  # decided at the first suspect: a scan is at most so often
    for page in _pages(ctx, query):
        marks = _marks(ctx, page)
        lost += _enqueue(
            ctx, [r for r, mark in zip(page, marks, strict=True) if mark is None], "lost"
        )
        old = [
            r for r, mark in zip(page, marks, strict=True) if mark is not None and mark < old_mark
        ]
        if old and scan is None:
            scan = _scan_due(ctx)
        if scan:
            suspects += old
    orphaned = _enqueue(ctx, _without_message(ctx, suspects), "orphaned") if suspects else 0
    return lost, orphaned


def _scan_due(ctx: WorkerContext) -> bool:
    """Claim the next scan of the queues, due once per `orphan_scan_interval_seconds`."""
    interval_ms = max(1, int(ctx.settings.orphan_scan_interval_seconds * 1000))
    return bool(ctx.redis.set(_key(ctx, QUEUES_SCANNED_KEY), time.time(), nx=True, px=interval_ms))


def _without_message(ctx: WorkerContext, suspects: list[Row[Any]]) -> list[Row[Any]]:
    """The suspects whose message is neither waiting in its queue nor delivered to a live
    worker.

    A job merely waiting its turn has its message in the queue; one a worker has taken has
    it in kombu's unacked hash until the task ends (and the worker drops the mark at once).
    A worker claims a job as soon as it receives it (the threads pool runs every message it
    prefetches), so a job still queued whose message was delivered longer ago than
    `orphan_mark_seconds` was taken by a worker that died before its claim: that message is
    counted as gone (kombu would restore it only after the visibility timeout). The claim is
    conditional, so a late duplicate does no harm.
    """
    queues = {ctx.registry.queue_of(r.model) for r in suspects}
    # Lists before the unacked hash: a message moving from one to the other is then seen.
    taken_since = time.time() - ctx.settings.orphan_mark_seconds
    present = _waiting_task_ids(ctx, queues) | _unacked_task_ids(ctx, taken_since)
    gone = [r for r in suspects if str(r.id) not in present]
    # A worker that took the message since the page was read has dropped the mark.
    return [r for r, mark in zip(gone, _marks(ctx, gone), strict=True) if mark is not None]


def _waiting_task_ids(ctx: WorkerContext, queues: set[str]) -> set[str]:
    """Task ids in every priority list of the queues, read in chunks of SCAN_CHUNK.

    Workers pop from the right and producers push on the left, so reading from the left by
    index may see a message twice but never skips one that stays in the list.
    """
    found: set[str] = set()
    for key in (k for queue in sorted(queues) for k in priority_lists(queue)):
        start = 0
        while True:
            chunk = ctx.broker.lrange(key, start, start + SCAN_CHUNK - 1)
            found.update(i for i in map(task_id_of, chunk) if i)
            if len(chunk) < SCAN_CHUNK:
                break
            start += SCAN_CHUNK
    return found


def _unacked_task_ids(ctx: WorkerContext, delivered_since: float) -> set[str]:
    """Task ids of the messages in kombu's unacked hash delivered since `delivered_since`
    (Unix time; kombu's index of the hash scores each delivery tag with its delivery time)."""
    # The old ones first: a message delivered in between is in the hash and not among them.
    stale = set(ctx.broker.zrangebyscore(UNACKED_INDEX_KEY, "-inf", delivered_since))
    stored = ctx.broker.hscan_iter(UNACKED_KEY, count=SCAN_CHUNK)
    return {i for i in (task_id_of(v) for tag, v in stored if tag not in stale) if i}


def _requeue_expired(ctx: WorkerContext) -> int:
    """Running jobs whose lease lapsed (a dead worker) and that nobody re-enqueued since."""
    query = select(Job.id, Job.model, Job.priority, Job.lease_expires_at).where(
        Job.status == JobStatus.running, Job.lease_expires_at < func.now()
    )
    count = 0
    for page in _pages(ctx, query):
        # A mark older than the lapsed lease belongs to an earlier delivery (a worker can take a
        # message before the API has marked it), so only a newer one means "already re-enqueued".
        wanted = [
            r
            for r, mark in zip(page, _marks(ctx, page), strict=True)
            if mark is None or mark < r.lease_expires_at.timestamp()
        ]
        count += _enqueue(ctx, wanted, "expired")
    return count


def _fail_exhausted(ctx: WorkerContext) -> int:
    """A job whose lease expired on its last allowed attempt fails with a clear error."""
    with ctx.sessions.begin() as session:
        failed = lifecycle.fail_exhausted(session.connection(), ctx.settings.max_attempts)
    limits.settle_unused(ctx.redis, [str(job_id) for job_id, _ in failed])
    for job_id, outcome in failed:
        publish_end(ctx.publish_script, str(job_id), outcome.closing_events(), ctx.settings)
    return len(failed)


# ------------------------------------------------------------------ streams of ended jobs


def close_streams(ctx: WorkerContext) -> int:
    """End the stream of every job that ended since the last pass and whose end is missing.

    The worker publishes `done` (or `error`) and the stream's TTL in one script after the job
    is finished in Postgres; if that publish fails, readers would wait for ever and the stream
    would never expire. A job is checked once, `stream_close_after_seconds` after it ended.
    """
    settings = ctx.settings
    with ctx.sessions.begin() as session:
        until: datetime = session.scalar(
            select(func.now() - timedelta(seconds=settings.stream_close_after_seconds))
        )
    checked = ctx.redis.get(_key(ctx, STREAMS_CHECKED_KEY))
    # On the first pass, look back as far as a closed stream would have lived.
    since = (
        datetime.fromisoformat(str(checked))
        if checked
        else until - timedelta(seconds=settings.stream_ttl_seconds)
    )
    closed = sum(_close_open(ctx, page) for page in _ended_pages(ctx, since, until))
    ctx.redis.set(_key(ctx, STREAMS_CHECKED_KEY), until.isoformat())
    if closed:
        log.warning("closed %d streams of ended jobs", closed)
    return closed


def _ended_pages(
    ctx: WorkerContext, since: datetime, until: datetime
) -> Iterator[Sequence[Row[Any]]]:
    """Jobs that ended in (since, until], by (finished_at, id), in pages of BATCH."""
    query = (
        select(
            Job.id,
            Job.status,
            Job.finished_at,
            Job.finish_reason,
            Job.input_tokens,
            Job.output_tokens,
            Job.cost_usd,
            Job.error_type,
            Job.error_message,
        )
        .where(
            Job.status.in_(TERMINAL_STATUSES),
            Job.finished_at > since,
            Job.finished_at <= until,
        )
        .order_by(Job.finished_at, Job.id)
        .limit(BATCH)
    )
    page = query
    while True:
        with ctx.sessions.begin() as session:
            rows = session.execute(page).all()
        if rows:
            yield rows
        if len(rows) < BATCH:
            return
        last = rows[-1]
        page = query.where(tuple_(Job.finished_at, Job.id) > (last.finished_at, last.id))


def _close_open(ctx: WorkerContext, rows: Sequence[Row[Any]]) -> int:
    """Close the streams among these that exist without a TTL (the end never reached them)."""
    with ctx.redis.pipeline(transaction=False) as pipe:
        for row in rows:
            pipe.ttl(stream_key(str(row.id)))
        ttls = pipe.execute()
    unclosed = [row for row, ttl in zip(rows, ttls, strict=True) if ttl == -1]
    for row in unclosed:
        _close(ctx, row)
    return len(unclosed)


def _close(ctx: WorkerContext, row: Row[Any]) -> None:
    """Append the job's closing events, rebuilt from its row, unless they are there; set the TTL."""
    job_id = str(row.id)
    last = ctx.redis.xrevrange(stream_key(job_id), count=1) or []
    ended = any(Event.from_entry(str(i), f).type in TERMINAL_EVENTS for i, f in last)  # type: ignore[arg-type]
    events = [] if ended else Outcome.of_row(row).closing_events()
    publish_end(ctx.publish_script, job_id, events, ctx.settings)


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
