"""The job lifecycle in Postgres: every change of a job's state, each one
prebuilt Core statement with bound parameters: claim with a lease, renew it, finish once;
cancel a queued job; fail one whose workers kept dying; expire one whose deadline passed
before it started; release one a stopping worker hands back. Also the events that close a
job's stream, built from how it ended.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol, cast

import asyncpg
import psycopg
from psycopg.rows import namedtuple_row
from pydantic import ValidationError
from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Integer,
    Interval,
    Numeric,
    String,
    Table,
    Text,
    Uuid,
    and_,
    bindparam,
    case,
    column,
    func,
    or_,
    select,
    update,
)
from sqlalchemy import exists as exists_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.engine import Compiled, make_url
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.types import TypeEngine

from inferq.db import STATEMENT_TIMEOUT_MS
from inferq.events import Event
from inferq.models import ApiKey, Job, JobStatus
from inferq.protocol import DoneData, ErrorData, JobInput, JobParams, StatusData, Usage


@dataclass(frozen=True, slots=True)
class Claim:
    """A worker's hold on a running job; only the holder of `token` may finish it."""

    job_id: uuid.UUID
    token: uuid.UUID
    attempt: int
    model: str
    input: JobInput
    params: JobParams
    created_at: datetime
    deadline_at: datetime | None
    started_at: datetime | None = None  # the first attempt's start: the run budget counts from it
    limited: bool = False  # its key has limits (as of the claim): its end settles them


class Unreadable(Exception):
    """A job was claimed whose stored input or params do not validate; `claim` (with empty
    ones) can still finish it."""

    def __init__(self, claim: Claim, error: ValidationError) -> None:
        super().__init__(f"the job's stored request is invalid: {error.error_count()} errors")
        self.claim = claim


class Ended(Protocol):
    """A job's row, or a query of these columns of it, once the job ended."""

    @property
    def status(self) -> str: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def input_tokens(self) -> int | None: ...
    @property
    def output_tokens(self) -> int | None: ...
    @property
    def cost_usd(self) -> Decimal | None: ...
    @property
    def error_type(self) -> str | None: ...
    @property
    def error_message(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job ended: what finishing it stores, and what its closing events say."""

    status: JobStatus
    output: str = ""
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    error_type: str | None = None
    error_message: str | None = None
    first_token_at: datetime | None = None

    @classmethod
    def of_row(cls, row: Ended) -> Outcome:
        return cls(
            JobStatus(row.status),
            finish_reason=row.finish_reason,
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            cost_usd=None if row.cost_usd is None else float(row.cost_usd),
            error_type=row.error_type,
            error_message=row.error_message,
        )

    @property
    def usage(self) -> Usage:
        return Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost_usd=self.cost_usd,
        )

    def closing_events(self) -> list[Event]:
        """The job's last events: its status, then `error` for a failure or an expiry, else
        `done`."""
        status = Event.of(StatusData(status=self.status))
        if self.error_type is not None or self.status is JobStatus.failed:
            error = ErrorData(type=self.error_type or "error", message=self.error_message or "")
            return [status, Event.of(error)]
        done = DoneData(status=self.status, finish_reason=self.finish_reason, usage=self.usage)
        return [status, Event.of(done)]


# Built once as Core statements with bound parameters: through an ORM session each of the
# worker's statements cost about 2.6 ms of CPU to build and run; this way, 0.6 ms (README,
# performance). The worker's run on an autocommit connection: one round trip each.
_jobs: Table = Job.__table__  # type: ignore[assignment]
# Its deadline passed before it ever started: it must not run (`expired`).
_OVERDUE = and_(
    _jobs.c.deadline_at.is_not(None),
    _jobs.c.deadline_at <= func.now(),
    _jobs.c.started_at.is_(None),
)
_LEASE = func.now() + bindparam("lease", type_=Interval)
# A job submitted while INFERQ_REDACT_INPUTS is on carries this in its params: the statement
# that ends it, whichever process runs it, also clears its input text (to {}).
REDACT_PARAM = "redact_input"
_REDACT = _jobs.c.params[REDACT_PARAM].as_boolean()
_END_REDACTION = {
    "input": case((_REDACT, func.jsonb_build_object()), else_=_jobs.c.input),
    "redacted_at": case((_REDACT, func.now()), else_=_jobs.c.redacted_at),
}
_keys: Table = ApiKey.__table__  # type: ignore[assignment]
# Whether the job's key has limits: a worker settles only those jobs (one primary-key read).
_LIMITED = (
    exists_()
    .where(
        _keys.c.id == _jobs.c.api_key_id,
        or_(
            _keys.c.rate_limit_per_minute.is_not(None),
            _keys.c.tokens_per_minute.is_not(None),
            _keys.c.daily_budget_usd.is_not(None),
            _keys.c.max_queued.is_not(None),
        ),
    )
    .label("limited")
)
_CLAIM = (
    update(_jobs)
    .where(
        _jobs.c.id == bindparam("job_id"),
        or_(
            _jobs.c.status == JobStatus.queued,
            and_(_jobs.c.status == JobStatus.running, _jobs.c.lease_expires_at < func.now()),
        ),
        _jobs.c.attempts < bindparam("max_attempts"),
        ~_OVERDUE,
    )
    .values(
        status=JobStatus.running,
        attempts=_jobs.c.attempts + 1,
        worker=bindparam("worker"),
        claim_token=bindparam("token"),
        lease_expires_at=_LEASE,
        started_at=func.coalesce(_jobs.c.started_at, func.now()),
    )
    .returning(
        _jobs.c.attempts,
        _jobs.c.model,
        _jobs.c.input,
        _jobs.c.params,
        _jobs.c.created_at,
        _jobs.c.deadline_at,
        _jobs.c.started_at,
        _LIMITED,
    )
)
# Every claim a worker process holds, in one statement: the claims it returns still hold.
_RENEW = (
    update(_jobs)
    .where(
        _jobs.c.claim_token.in_(bindparam("tokens", expanding=True)),
        _jobs.c.status == JobStatus.running,
    )
    .values(lease_expires_at=_LEASE)
    .returning(_jobs.c.claim_token)
)
_FINISH = (
    update(_jobs)
    .where(
        _jobs.c.id == bindparam("job_id"),
        _jobs.c.status == JobStatus.running,
        _jobs.c.claim_token == bindparam("token"),
    )
    .values(
        status=bindparam("status"),
        output=bindparam("output"),
        finish_reason=bindparam("finish_reason"),
        input_tokens=bindparam("input_tokens"),
        output_tokens=bindparam("output_tokens"),
        cost_usd=bindparam("cost_usd"),
        error_type=bindparam("error_type"),
        error_message=bindparam("error_message"),
        finished_at=func.now(),
        lease_expires_at=None,
        first_token_at=func.coalesce(
            bindparam("first_token_at", type_=_jobs.c.first_token_at.type),
            _jobs.c.first_token_at,
        ),
        **_END_REDACTION,
    )
)
# The finishes of several jobs in one statement: `_FINISH`'s values for each, given as one
# array a column (`_finish_params`' keys, pluralised) and read back row by row by unnest. It
# returns the claim token of each job it finished.
_ENDS_COLUMNS: list[tuple[str, TypeEngine[Any]]] = [
    ("job_id", Uuid()),
    ("token", Uuid()),
    ("status", String()),
    ("output", Text()),
    ("finish_reason", String()),
    ("input_tokens", Integer()),
    ("output_tokens", Integer()),
    ("cost_usd", Numeric()),
    ("error_type", String()),
    ("error_message", Text()),
    ("first_token_at", DateTime(timezone=True)),
]
_ends = (
    func.unnest(*(bindparam(f"{name}s", type_=ARRAY(type_)) for name, type_ in _ENDS_COLUMNS))
    .table_valued(*(column(name, type_) for name, type_ in _ENDS_COLUMNS))
    .render_derived(name="ends")
)
_FINISH_MANY = (
    update(_jobs)
    .where(
        _jobs.c.id == _ends.c.job_id,
        _jobs.c.status == JobStatus.running,
        _jobs.c.claim_token == _ends.c.token,
    )
    .values(
        status=_ends.c.status,
        output=_ends.c.output,
        finish_reason=_ends.c.finish_reason,
        input_tokens=_ends.c.input_tokens,
        output_tokens=_ends.c.output_tokens,
        cost_usd=_ends.c.cost_usd,
        error_type=_ends.c.error_type,
        error_message=_ends.c.error_message,
        finished_at=func.now(),
        lease_expires_at=None,
        first_token_at=func.coalesce(_ends.c.first_token_at, _jobs.c.first_token_at),
        **_END_REDACTION,
    )
    .returning(_jobs.c.claim_token)
)
# A queued job is cancelled at once (a running one by its worker, which finishes it).
_CANCEL_QUEUED = (
    update(_jobs)
    .where(_jobs.c.id == bindparam("job_id"), _jobs.c.status == JobStatus.queued)
    .values(
        status=JobStatus.cancelled,
        finish_reason="cancelled",
        finished_at=func.now(),
        **_END_REDACTION,
    )
    .returning(*_jobs.c)
)
# A job whose lease lapsed on its last allowed attempt: its workers kept dying.
_FAIL_EXHAUSTED = (
    update(_jobs)
    .where(
        _jobs.c.status == JobStatus.running,
        _jobs.c.lease_expires_at < func.now(),
        _jobs.c.attempts >= bindparam("max_attempts"),
    )
    .values(
        status=JobStatus.failed,
        error_type=bindparam("error_type"),
        error_message=bindparam("error_message"),
        finished_at=func.now(),
        lease_expires_at=None,
        **_END_REDACTION,
    )
    .returning(_jobs.c.id)
)
_EXISTS = select(_jobs.c.id).where(_jobs.c.id == bindparam("job_id"))

EXPIRED = Outcome(
    JobStatus.expired,
    error_type="deadline_exceeded",
    error_message="the job's deadline passed before it started",
)
_EXPIRE_VALUES = {
    "status": EXPIRED.status,
    "error_type": EXPIRED.error_type,
    "error_message": EXPIRED.error_message,
    "finished_at": func.now(),
    **_END_REDACTION,
}
_EXPIRE = (
    update(_jobs)
    .where(_jobs.c.id == bindparam("job_id"), _jobs.c.status == JobStatus.queued, _OVERDUE)
    .values(_EXPIRE_VALUES)
    .returning(_jobs.c.model)
)
# The sweeper's pass over queued jobs that nobody claimed in time; ix_jobs_sweep covers status.
_EXPIRE_OVERDUE = (
    update(_jobs)
    .where(
        _jobs.c.id.in_(
            select(_jobs.c.id)
            .where(_jobs.c.status == JobStatus.queued, _OVERDUE)
            .order_by(_jobs.c.id)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(_EXPIRE_VALUES)
    .returning(_jobs.c.id, _jobs.c.model)
)
# A worker that stops hands the job back: the lease ends now, so the next delivery claims it
# at once (as if the worker had died, without waiting for the lease to lapse). Dropping the
# token keeps a lease renewal already under way from extending it again.
_RELEASE = (
    update(_jobs)
    .where(
        _jobs.c.id == bindparam("job_id"),
        _jobs.c.status == JobStatus.running,
        _jobs.c.claim_token == bindparam("token"),
    )
    .values(lease_expires_at=func.now(), claim_token=None)
    .returning(_jobs.c.model, _jobs.c.priority)
)


def claim(
    conn: Connection, job_id: uuid.UUID, worker: str, lease_seconds: float, max_attempts: int
) -> Claim | None:
    """Take a queued job, or a running one whose lease expired; None if someone else has it.

    Raises Unreadable for a job whose stored request does not validate (it is claimed)."""
    token = uuid.uuid4()
    row = conn.execute(_CLAIM, _claim_params(job_id, worker, token, lease_seconds, max_attempts))
    return _claimed(job_id, token, row.first())


def _claim_params(
    job_id: uuid.UUID, worker: str, token: uuid.UUID, lease_seconds: float, max_attempts: int
) -> dict[str, object]:
    return {
        "job_id": job_id,
        "max_attempts": max_attempts,
        "worker": worker,
        "token": token,
        "lease": timedelta(seconds=lease_seconds),
    }


def _claimed(job_id: uuid.UUID, token: uuid.UUID, row: Any) -> Claim | None:
    """The claim a row returned by _CLAIM stands for (None: no row)."""
    if row is None:
        return None
    held = Claim(
        job_id,
        token,
        row.attempts,
        row.model,
        JobInput(),
        JobParams(max_tokens=0),
        row.created_at,
        row.deadline_at,
        row.started_at,
        bool(row.limited),
    )
    try:
        request = JobInput.model_validate(row.input), JobParams.model_validate(row.params)
    except ValidationError as exc:
        raise Unreadable(held, exc) from exc
    return replace(held, input=request[0], params=request[1])


def renew(conn: Connection, tokens: Sequence[uuid.UUID], lease_seconds: float) -> set[uuid.UUID]:
    """Extend the leases of these claims; the claims that still hold."""
    rows = conn.execute(_RENEW, {"tokens": list(tokens), "lease": timedelta(seconds=lease_seconds)})
    return set(rows.scalars())


def finish(conn: Connection, claim_: Claim, outcome: Outcome) -> bool:
    """Record the end of a job; False when the claim was lost or the job already ended."""
    return bool(conn.execute(_FINISH, _finish_params(claim_, outcome)).rowcount)


def _finish_params(claim_: Claim, outcome: Outcome) -> dict[str, object]:
    return {
        "job_id": claim_.job_id,
        "token": claim_.token,
        "status": outcome.status.value,
        "output": outcome.output,
        "finish_reason": outcome.finish_reason,
        "input_tokens": outcome.input_tokens,
        "output_tokens": outcome.output_tokens,
        "cost_usd": None if outcome.cost_usd is None else Decimal(str(outcome.cost_usd)),
        "error_type": outcome.error_type,
        "error_message": outcome.error_message,
        "first_token_at": outcome.first_token_at,
    }


class Direct:
    """A job's claim and its finish, the two statements a worker runs for every job, each on
    a pooled connection of `engine` taken for it alone, in autocommit: one round trip each.

    Each statement is compiled once for the engine's dialect and run straight on the
    driver's (psycopg's) connection: SQLAlchemy's layer around an execution (a Connection,
    its events and isolation switch, a result object) cost more of a worker's CPU than the
    statement itself (docs/performance.md). The pool still checks a connection it hands out
    (`inferq.db`), so that one a Postgres restart left dead is replaced before the statement
    is sent.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._claim = _CLAIM.compile(dialect=engine.dialect)
        self._finish = _FINISH.compile(dialect=engine.dialect)

    def claim(
        self, job_id: uuid.UUID, worker: str, lease_seconds: float, max_attempts: int
    ) -> Claim | None:
        """As `claim`."""
        token = uuid.uuid4()
        params = _claim_params(job_id, worker, token, lease_seconds, max_attempts)
        row, _ = self._execute(self._claim, params)
        return _claimed(job_id, token, row)

    def finish(self, claim_: Claim, outcome: Outcome) -> bool:
        """As `finish`."""
        _, rows = self._execute(self._finish, _finish_params(claim_, outcome))
        return bool(rows)

    def _execute(self, compiled: Compiled, params: dict[str, object]) -> tuple[Any, int]:
        """The statement's first row (None without one) and the rows it changed."""
        pooled = self.engine.raw_connection()
        try:
            driver: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
            driver.autocommit = True
            try:
                with driver.cursor(row_factory=namedtuple_row) as cursor:
                    cursor.execute(compiled.string, compiled.construct_params(params))
                    row = cursor.fetchone() if cursor.description else None
                    changed = cursor.rowcount
            finally:
                if driver.broken:
                    pooled.invalidate()  # not handed out again
                else:
                    driver.autocommit = False  # as the pool's other users expect it
        finally:
            pooled.close()
        return row, changed


async def _nothing_to_reset(_connection: asyncpg.Connection) -> None:
    """A connection of `LoopFinish` runs one autocommitted statement at a time and leaves no
    session state: asyncpg's default reset on release (a round trip of `RESET ALL`,
    `UNLISTEN *` and the like) has nothing to undo. A transaction left open is still rolled
    back by asyncpg before this is called."""


class LoopFinish:
    """The finish statement on asyncpg, for a worker's stream loop: it ends a job whose
    stream ended well on the loop that read it, so that the job's thread does not wake up for
    the statement and for the closing write (workers/engine.py). The finishes asked in one
    turn of the loop go together: one of them alone as `finish`'s statement, several in one
    statement (`_FINISH_MANY`), on one connection and in one round trip. Streams paced to
    the loop's flush ticks end together, at a tick. Both statements are compiled once for
    asyncpg; the pool's connections open as they are first needed.
    """

    def __init__(self, database_url: str, connections: int) -> None:
        self._dsn = make_url(database_url).set(drivername="postgresql")
        self._connections = connections
        dialect = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]
        self._one = cast(SQLCompiler, _FINISH.compile(dialect=dialect))
        self._many = cast(SQLCompiler, _FINISH_MANY.compile(dialect=dialect))
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._closed = False
        # The finishes asked in this turn of the loop, to go in the next one.
        self._asked: list[tuple[Claim, Outcome, asyncio.Future[bool]]] = []

    async def finish(self, claim_: Claim, outcome: Outcome) -> bool:
        """As `finish`."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._asked.append((claim_, outcome, done))
        if len(self._asked) == 1:
            loop.call_soon(self._send)
        return await done

    def _send(self) -> None:
        asked, self._asked = self._asked, []
        asyncio.get_running_loop().create_task(self._run(asked))

    async def _run(self, asked: list[tuple[Claim, Outcome, asyncio.Future[bool]]]) -> None:
        try:
            pool = self._pool or await self._open()
            if len(asked) == 1:
                claim_, outcome, _ = asked[0]
                status = await pool.execute(*_args(self._one, _finish_params(claim_, outcome)))
                finished = {claim_.token} if status == "UPDATE 1" else set()
            else:
                columns: dict[str, list[object]] = {f"{name}s": [] for name, _ in _ENDS_COLUMNS}
                for claim_, outcome, _ in asked:
                    for name, value in _finish_params(claim_, outcome).items():
                        columns[f"{name}s"].append(value)
                rows = await pool.fetch(*_args(self._many, columns))
                finished = {row[0] for row in rows}
        except Exception as exc:
            for _, _, done in asked:
                if not done.done():
                    done.set_exception(exc)
            return
        for claim_, _, done in asked:
            if not done.done():  # not cancelled meanwhile
                done.set_result(claim_.token in finished)

    async def _open(self) -> asyncpg.Pool:
        """The pool, made by the first finish (its connections open as they are needed)."""
        async with self._opening:
            if self._closed:  # a finish asked as the loop stops: its thread finishes the job
                raise ConnectionError("the stream loop's finishes are closed")
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._dsn.render_as_string(hide_password=False),
                    min_size=0,
                    max_size=self._connections,
                    server_settings={"statement_timeout": str(STATEMENT_TIMEOUT_MS)},
                    command_timeout=STATEMENT_TIMEOUT_MS / 1000,
                    reset=_nothing_to_reset,
                )
            return self._pool

    async def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


def _args(compiled: SQLCompiler, params: Mapping[str, object]) -> list[object]:
    """A compiled statement and its values, as asyncpg takes them."""
    values = compiled.construct_params(dict(params))
    return [compiled.string, *(values[name] for name in compiled.positiontup or [])]


async def cancel_queued(session: AsyncSession, job_id: uuid.UUID) -> Job | None:
    """Cancel the job if it is still queued: the cancelled job, else None."""
    cancelled: Job | None = await session.scalar(
        select(Job).from_statement(_CANCEL_QUEUED).execution_options(populate_existing=True),
        {"job_id": job_id},
    )
    return cancelled


def exhausted_message(max_attempts: int) -> str:
    return f"the job's worker stopped responding on each of {max_attempts} attempts"


def fail_exhausted(conn: Connection, max_attempts: int) -> list[tuple[uuid.UUID, Outcome]]:
    """Fail the running jobs whose lease lapsed on their last allowed attempt: each one's id
    and how it ended."""
    outcome = Outcome(
        JobStatus.failed, error_type="worker_lost", error_message=exhausted_message(max_attempts)
    )
    rows = conn.execute(
        _FAIL_EXHAUSTED,
        {
            "max_attempts": max_attempts,
            "error_type": outcome.error_type,
            "error_message": outcome.error_message,
        },
    )
    return [(job_id, outcome) for job_id in rows.scalars()]


def exists(conn: Connection, job_id: uuid.UUID) -> bool:
    """Whether the database holds the job (asked only after a claim found no row)."""
    return conn.execute(_EXISTS, {"job_id": job_id}).first() is not None


def expire(conn: Connection, job_id: uuid.UUID) -> str | None:
    """End a queued job whose deadline passed before it started: its model, None if it is
    not such a job."""
    model: str | None = conn.execute(_EXPIRE, {"job_id": job_id}).scalar()
    return model


def expire_overdue(conn: Connection, limit: int) -> list[tuple[uuid.UUID, str]]:
    """End up to `limit` queued jobs whose deadline passed: (id, model) of each."""
    rows = conn.execute(_EXPIRE_OVERDUE, {"limit": limit}).all()
    return [(row.id, row.model) for row in rows]


def release(conn: Connection, claim_: Claim) -> tuple[str, str] | None:
    """Give up a running claim so that the job is claimable now: (model, priority) to enqueue
    it again, or None when the claim was already lost or the job ended."""
    row = conn.execute(_RELEASE, {"job_id": claim_.job_id, "token": claim_.token}).first()
    return None if row is None else (row.model, row.priority)
