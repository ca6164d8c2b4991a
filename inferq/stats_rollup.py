"""The daily rollup behind `/v1/stats`: each closed (tenant, UTC day), every grouping.

Percentiles do not add up across days or groups, so a closed day is rolled up once for
each grouping of model, key and user (GROUPING SETS, eight of them) with the exact
percentiles of that day's jobs. A day is closed an hour after its end, once none of its
jobs is still queued or running: from then on its jobs' figures never change (terminal
states are final). Their feedback and evaluations can: a trigger counts every change of
them against the job's (tenant, day) in `stats_changes`, and the rollup remembers the count
it saw; a day whose count moved on is read live until it is rolled up again.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Date, Engine, Label, String, and_, delete, func, literal, select, tuple_
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from inferq.models import TERMINAL_STATUSES, Job, StatsChange, StatsDaily, StatsDay
from inferq.stats import GROUP_COLUMNS, GROUPING_BITS, days_scope, select_stats

log = logging.getLogger("inferq.stats")

CLOSED_AFTER = timedelta(hours=1)  # past midnight UTC, for submits committed late
RECENT_DAYS = 3  # how far back a routine run looks for days that closed

_GROUPED = ("model", "key", "user")
_COLUMNS = {"model": "model", "key": "api_key_id", "user": "user"}


def roll_up(engine: Engine, now: datetime | None = None, days: int = RECENT_DAYS) -> int:
    """Roll up the closed days of the last `days` not rolled up yet, and the stale ones;
    the number of (tenant, day) rolled up."""
    now = now or datetime.now(UTC)
    rolled = 0
    with engine.connect() as conn:
        due = _due(conn, now, days)
    for tenant, day in due:
        try:
            rolled += roll_up_day(engine, tenant, day)
        except DBAPIError:
            # One day that fails (a statement over its timeout, say) stays read live; it must
            # not hold up the days after it, which every run would otherwise never reach.
            log.exception("stats rollup of %s %s failed; it stays read live", tenant, day)
    return rolled


def _due(conn: Connection, now: datetime, days: int) -> list[tuple[str, date]]:
    last_closed = (now - CLOSED_AFTER).date() - timedelta(days=1)
    first = last_closed - timedelta(days=days - 1)
    day = GROUP_COLUMNS["day"]
    recent = conn.execute(
        select(Job.tenant, day)
        .where(days_scope_all(first, last_closed))
        .group_by(Job.tenant, day)
        .except_(select(StatsDay.tenant, StatsDay.day))
    ).all()
    stale = conn.execute(
        select(StatsDay.tenant, StatsDay.day)
        .join(
            StatsChange,
            and_(StatsChange.tenant == StatsDay.tenant, StatsChange.day == StatsDay.day),
        )
        .where(StatsChange.changes != StatsDay.changes_seen)
    ).all()
    return sorted({(r[0], r[1]) for r in itertools.chain(recent, stale)})


def days_scope_all(first: date, last: date) -> Any:
    """Every tenant's counted jobs created from `first` to `last` (inclusive)."""
    start = datetime.combine(first, datetime.min.time(), UTC)
    end = datetime.combine(last + timedelta(days=1), datetime.min.time(), UTC)
    return and_(Job.judge_of.is_(None), Job.created_at >= start, Job.created_at < end)


def roll_up_day(engine: Engine, tenant: str, day: date) -> bool:
    """Roll up one (tenant, day) from one snapshot; False if one of its jobs is still open
    (or another run rolled it up at the same time)."""
    scope = days_scope(tenant, [(day, day)])
    try:
        snapshot = engine.connect().execution_options(isolation_level="REPEATABLE READ")
        with snapshot as conn, conn.begin():
            open_jobs = conn.scalar(
                select(func.count()).where(scope, Job.status.not_in(TERMINAL_STATUSES))
            )
            if open_jobs:
                return False
            changes = conn.scalar(
                select(StatsChange.changes).where(
                    StatsChange.tenant == tenant, StatsChange.day == day
                )
            )
            conn.execute(
                delete(StatsDaily).where(StatsDaily.tenant == tenant, StatsDaily.day == day)
            )
            conn.execute(_insert_groups(scope, tenant, day))
            seen = insert(StatsDay).values(tenant=tenant, day=day, changes_seen=changes or 0)
            conn.execute(
                seen.on_conflict_do_update(
                    index_elements=[StatsDay.tenant, StatsDay.day],
                    set_={
                        "changes_seen": seen.excluded.changes_seen,
                        "rolled_up_at": func.now(),
                    },
                )
            )
    except (IntegrityError, DBAPIError) as exc:
        if not _concurrent(exc):
            raise
        log.info("stats rollup of %s %s raced another run; left to it", tenant, day)
        return False
    return True


def _concurrent(exc: DBAPIError) -> bool:
    """A unique violation or a serialization failure: another run rolled up the same day."""
    return getattr(exc.orig, "sqlstate", None) in ("23505", "40001")


def _insert_groups(scope: Any, tenant: str, day: date) -> Insert:
    """INSERT … SELECT of one row per group of every grouping of the day's jobs."""
    columns = [GROUP_COLUMNS[name] for name in _GROUPED]
    # GROUPING(user, key, model) has a bit set for each column a set leaves out.
    left_out = func.grouping(*reversed(columns)).label("left_out")
    labelled: list[Label[Any]] = [c.label(name) for name, c in zip(_GROUPED, columns, strict=True)]
    sets = func.grouping_sets(*(tuple_(*c) for c in _subsets(columns)))
    groups = select_stats(scope, [*labelled, left_out], [sets]).subquery("groups")
    figures = [c for c in groups.c if c.key not in (*_GROUPED, "left_out")]
    rows = select(
        literal(tenant, String),
        literal(day, Date),
        sum(GROUPING_BITS.values()) - groups.c.left_out,
        *(groups.c[name] for name in _GROUPED),
        *figures,
    )
    names = [
        "tenant",
        "day",
        "grouping",
        *(_COLUMNS[n] for n in _GROUPED),
        *(c.key for c in figures),
    ]
    return insert(StatsDaily).from_select(names, rows)


def _subsets(columns: list[Any]) -> Iterable[tuple[Any, ...]]:
    for size in range(len(columns) + 1):
        yield from itertools.combinations(columns, size)
