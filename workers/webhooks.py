"""Webhook delivery, run by the `inferq beat` process.

A dispatcher thread polls Postgres for finished jobs whose webhook is due and hands each to a
small thread pool, so that one slow receiver does not hold up the others. Polling the jobs
table, rather than hooking every path to a terminal state (a worker's finish, a cancel in the
API, the sweeper, a deadline), delivers every end whoever wrote it.

Each try is a row in `webhook_deliveries`; anything but a 2xx within the timeout is tried
again with doubling, jittered back-off until the retry window after the job's end has passed.
A claimed job's `webhook_next_at` moves ahead first (`claim_seconds`), so a second beat never
takes the same delivery, and a delivery lost with its process is tried again after that.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Connection, Table, func, or_, select, text, update
from sqlalchemy.orm import Session, defer

from inferq.metrics import WEBHOOK_DELIVERIES
from inferq.models import WEBHOOK_PENDING, Job, WebhookDelivery
from inferq.settings import Settings
from inferq.webhooks import (
    UnsafeUrl,
    delivery_addresses,
    insert_secret,
    job_payload,
    select_secret,
    signed_headers,
    wanted,
)
from workers.context import WorkerContext

log = logging.getLogger("inferq.webhooks")

QUEUED_PER_THREAD = 4  # claimed deliveries waiting for a thread, per thread
MAX_ADDRESSES = 3  # addresses of a host tried in turn when a connection is refused
USER_AGENT = "inferq-webhooks"

_jobs: Table = Job.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Due:
    job_id: uuid.UUID
    status: str
    webhook: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Try:
    """What one try came to: the receiver's status code, or why there was none."""

    status_code: int | None = None
    error: str | None = None
    refused: bool = False  # the URL guard refused it; nothing was sent

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True, slots=True)
class Message:
    job_id: uuid.UUID
    url: str
    body: bytes
    secret: str
    attempt: int
    ended_at: datetime


def retry_delay(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Back-off after the `attempt`-th failed try: doubling from `base` up to `cap`, its upper
    half random so that receivers that failed together are not all tried again together."""
    delay = min(cap, base * 2 ** min(attempt - 1, 62))
    return delay / 2 + rand() * delay / 2


# -- Postgres -----------------------------------------------------------------------------


def claim_seconds(settings: Settings) -> float:
    """How long a claim holds: longer than a claimed delivery can wait for a thread and try."""
    return max(60.0, settings.webhook_timeout_seconds * (QUEUED_PER_THREAD + 1) * MAX_ADDRESSES)


def claim_due(conn: Connection, limit: int, hold_seconds: float) -> list[Due]:
    """Take up to `limit` due deliveries, oldest due first, each held for `hold_seconds`."""
    due = (
        select(_jobs.c.id)
        .where(
            text(WEBHOOK_PENDING),  # word for word the partial index's predicate
            or_(_jobs.c.webhook_next_at.is_(None), _jobs.c.webhook_next_at <= func.now()),
        )
        .order_by(func.coalesce(_jobs.c.webhook_next_at, _jobs.c.finished_at))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = conn.execute(
        update(_jobs)
        .where(_jobs.c.id.in_(due.scalar_subquery()))
        .values(webhook_next_at=func.now() + timedelta(seconds=hold_seconds))
        .returning(_jobs.c.id, _jobs.c.status, _jobs.c.webhook)
    ).all()
    return [Due(r.id, r.status, r.webhook) for r in rows]


def settle(conn: Connection, job_ids: list[uuid.UUID]) -> None:
    """Nothing (more) to deliver for these jobs."""
    conn.execute(
        update(_jobs).where(_jobs.c.id.in_(job_ids)).values(webhook_done=True, webhook_next_at=None)
    )


def tenant_secret(session: Session, tenant: str) -> str:
    """The tenant's signing secret, made on first use."""
    secret = session.scalar(select_secret(tenant))
    if secret is None:
        session.execute(insert_secret(tenant))
        secret = session.scalar(select_secret(tenant))
    assert secret is not None
    return secret


def load_message(session: Session, job_id: uuid.UUID) -> Message | None:
    job = session.scalar(
        select(Job).where(Job.id == job_id).options(defer(Job.input), defer(Job.params))
    )
    if job is None or not job.webhook:
        return None
    last = session.scalar(
        select(func.max(WebhookDelivery.attempt)).where(WebhookDelivery.job_id == job_id)
    )
    return Message(
        job_id=job.id,
        url=job.webhook["url"],
        body=job_payload(job).model_dump_json().encode(),
        secret=tenant_secret(session, job.tenant),
        attempt=(last or 0) + 1,
        ended_at=job.finished_at or job.created_at,
    )


def outcome_of(result: Try, next_try: datetime | None) -> str:
    if result.ok:
        return "delivered"
    if next_try is None:
        return "gave_up"
    return "refused" if result.refused else "failed"


def record(session: Session, message: Message, result: Try, settings: Settings) -> str:
    """Write the try and the job's next step; answer the try's outcome (the metric's label)."""
    now = datetime.now(UTC)
    next_try: datetime | None = None
    if not result.ok:
        delay = retry_delay(
            message.attempt, settings.webhook_retry_base_seconds, settings.webhook_retry_max_seconds
        )
        next_try = now + timedelta(seconds=delay)
        if next_try > message.ended_at + timedelta(seconds=settings.webhook_retry_window_seconds):
            next_try = None
    session.add(
        WebhookDelivery(
            job_id=message.job_id,
            attempt=message.attempt,
            status_code=result.status_code,
            error=result.error,
            next_try_at=next_try,
            delivered_at=now if result.ok else None,
        )
    )
    session.execute(
        update(Job)
        .where(Job.id == message.job_id)
        .values(webhook_next_at=next_try, webhook_done=next_try is None)
    )
    return outcome_of(result, next_try)


# -- HTTP ---------------------------------------------------------------------------------


def pinned_request(
    http: httpx.Client, url: str, address: str, headers: dict[str, str], body: bytes
) -> httpx.Request:
    """A POST to `url` sent to `address`, the one the guard checked: Host and TLS name (SNI and
    certificate check) stay the URL's host."""
    original = httpx.URL(url)
    return http.build_request(
        "POST",
        original.copy_with(host=address),
        content=body,
        # Connection: close, because a pooled connection is keyed by address, not by host name.
        headers={**headers, "host": original.netloc.decode("ascii"), "connection": "close"},
        extensions={"sni_hostname": original.host},
    )


def send(http: httpx.Client, request: httpx.Request) -> Try:
    response = http.send(request, stream=True)  # the body is not read: only the status counts
    response.close()
    if response.is_success:
        return Try(status_code=response.status_code)
    error = f"the receiver answered {response.status_code}"
    if response.is_redirect:
        error += " (redirects are not followed)"
    return Try(status_code=response.status_code, error=error)


def post(http: httpx.Client, message: Message, allow_private: bool) -> Try:
    """One try: guard the URL, sign, POST. Never raises for the receiver's faults."""
    try:
        addresses = delivery_addresses(message.url, allow_private)
    except UnsafeUrl as exc:
        return Try(error=str(exc), refused=True)
    headers = signed_headers(message.secret, str(message.job_id), message.body)
    result = Try(error="no address to connect to")
    for address in addresses[:MAX_ADDRESSES]:
        request = pinned_request(http, message.url, address, headers, message.body)
        try:
            return send(http, request)
        except httpx.ConnectError as exc:  # refused or unreachable: the next address may answer
            result = Try(error=f"{type(exc).__name__}: {exc}")
        except httpx.HTTPError as exc:
            return Try(error=f"{type(exc).__name__}: {exc}")
    return result


# -- the dispatcher -----------------------------------------------------------------------


class Dispatcher:
    """Polls for due deliveries and runs each on a bounded thread pool."""

    def __init__(self, ctx: WorkerContext) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self.settings = settings
        self.pool = ThreadPoolExecutor(settings.webhook_concurrency, "inferq-webhook")
        self.http = httpx.Client(
            timeout=settings.webhook_timeout_seconds,
            follow_redirects=False,
            trust_env=False,  # no proxy from the environment: the guard checks direct addresses
            headers={"user-agent": USER_AGENT},
        )
        self.inflight: set[Future[None]] = set()
        self.stopping = threading.Event()

    def poll(self) -> int:
        """Claim what the pool has room for and hand it over; answer how many were claimed."""
        self.inflight = {f for f in self.inflight if not f.done()}
        room = self.settings.webhook_concurrency * QUEUED_PER_THREAD - len(self.inflight)
        if room <= 0:
            return 0
        with self.ctx.autocommit.connect() as conn:
            due = claim_due(conn, room, claim_seconds(self.settings))
            unwanted = [d.job_id for d in due if not wanted(d.webhook, d.status)]
            if unwanted:
                settle(conn, unwanted)
        for item in due:
            if wanted(item.webhook, item.status):
                self.inflight.add(self.pool.submit(self.deliver, item.job_id))
        return len(due) if len(due) == room else 0

    def deliver(self, job_id: uuid.UUID) -> None:
        try:
            with self.ctx.sessions.begin() as session:
                message = load_message(session, job_id)
            if message is None:
                with self.ctx.autocommit.connect() as conn:
                    settle(conn, [job_id])
                return
            result = post(self.http, message, self.settings.webhook_allow_private)
            with self.ctx.sessions.begin() as session:
                outcome = record(session, message, result, self.settings)
            WEBHOOK_DELIVERIES.labels(outcome).inc()
            log.log(
                logging.INFO if result.ok else logging.WARNING,
                "webhook %s",
                outcome,
                extra={"job_id": str(job_id), "attempt": message.attempt, "error": result.error},
            )
        except Exception:
            # The claim lapses (claim_seconds) and the delivery is tried again then.
            log.exception("webhook delivery failed", extra={"job_id": str(job_id)})

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                full = self.poll()
            except Exception:
                log.exception("webhook poll failed; trying again next interval")
                full = 0
            if not full:
                self.stopping.wait(self.settings.webhook_poll_seconds)

    def stop(self) -> None:
        self.stopping.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()


def start_dispatcher(ctx: WorkerContext) -> Dispatcher:
    dispatcher = Dispatcher(ctx)
    threading.Thread(target=dispatcher.run, name="inferq-webhooks", daemon=True).start()
    return dispatcher
