"""A tenant's figures over a range of days, grouped: the one query behind `/v1/stats`.

A job belongs to the UTC day of its `created_at`. A judge's own jobs (`judge_of` set) never
count. Percentiles are Postgres's `percentile_cont` (linear interpolation between the
closest ranks) over the jobs that have the timing: a job that never started has no
`queue_ms`, one that produced no token no `ttft_ms` nor `tokens_per_second`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Date,
    Float,
    Integer,
    Label,
    Select,
    SQLColumnExpression,
    Subquery,
    and_,
    case,
    cast,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from inferq.models import (
    ApiKey,
    Evaluation,
    Feedback,
    Job,
    JobStatus,
    StatsChange,
    StatsDaily,
    StatsDay,
)

GROUPS = ("model", "key", "user", "day")
DEFAULT_DAYS = 7  # no `from`: the 7 days ending with `to`
MAX_DAYS = 92  # the longest range asked at once: any calendar quarter
PERCENTILES = (0.5, 0.95, 0.99)
TIMINGS = ("queue_ms", "ttft_ms", "duration_ms", "tokens_per_second")
BOOTSTRAP_NAME = "bootstrap"  # the key of jobs with no key row
DAY = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
GROUPING_BITS = {"model": 1, "key": 2, "user": 4}  # the rollup's `grouping` column
# For the stats transaction only: compiling (JIT) costs more than it saves on these queries,
# and the sorts of a live range stay in memory.
TUNING = text("SELECT set_config('jit', 'off', true), set_config('work_mem', '64MB', true)")


class StatsParamError(ValueError):
    """A range or grouping the stats cannot answer; the message says why."""


@dataclass(frozen=True, slots=True)
class StatsQuery:
    tenant: str
    first_day: date
    last_day: date  # inclusive
    group_by: tuple[str, ...] = ()

    @property
    def days(self) -> list[date]:
        count = (self.last_day - self.first_day).days + 1
        return [self.first_day + timedelta(days=n) for n in range(count)]


@dataclass(frozen=True, slots=True)
class Quantiles:
    p50: float | None
    p95: float | None
    p99: float | None


@dataclass(slots=True)
class StatsRow:
    """One group's figures; the group fields not asked for stay None."""

    model: str | None = None
    key_id: uuid.UUID | None = None
    key_name: str | None = None
    user: str | None = None
    day: date | None = None
    jobs: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    cache_hits: int = 0
    feedback_up: int = 0
    feedback_down: int = 0
    judge_score_avg: float | None = None
    timings: dict[str, Quantiles] = field(default_factory=dict)

    @property
    def cache_hit_rate(self) -> float:
        return round(self.cache_hits / self.jobs, 4) if self.jobs else 0.0

    @property
    def error_rate(self) -> float:
        return round(self.failed / self.jobs, 4) if self.jobs else 0.0


def parse_group_by(text: str | None) -> tuple[str, ...]:
    """`model,day` as ("model", "day"): known names, each once, in the order given."""
    names: list[str] = []
    for name in (part.strip() for part in (text or "").split(",")):
        if not name:
            continue
        if name not in GROUPS:
            raise StatsParamError(f"group_by: unknown {name!r}; use any of {', '.join(GROUPS)}")
        if name not in names:
            names.append(name)
    return tuple(names)


def parse_day(text: str, param: str) -> date:
    """`YYYY-MM-DD` as a date (only that spelling: ISO 8601 has others)."""
    try:
        if DAY.fullmatch(text) and (day := date.fromisoformat(text)) < date.max:
            return day  # (the last day there is has no midnight after it)
    except ValueError:
        pass  # a day that does not exist, such as 2026-02-30
    raise StatsParamError(f"{param}: {text!r} is not a date as YYYY-MM-DD")


def parse_range(first: str | None, last: str | None, today: date) -> tuple[date, date]:
    """The inclusive UTC days asked: `to` defaults to today, `from` to 6 days before `to`."""
    last_day = parse_day(last, "to") if last else today
    first_day = parse_day(first, "from") if first else _week_ending(last_day)
    if first_day > last_day:
        raise StatsParamError(f"from ({first_day}) is after to ({last_day})")
    days = (last_day - first_day).days + 1
    if days > MAX_DAYS:
        raise StatsParamError(f"the range is {days} days; ask for at most {MAX_DAYS} at once")
    return first_day, last_day


def _week_ending(day: date) -> date:
    """The first of the DEFAULT_DAYS days ending with `day`, or the first day there is."""
    return date.fromordinal(max(1, day.toordinal() - (DEFAULT_DAYS - 1)))


# -- the query -------------------------------------------------------------------------------


def _seconds(later: Any, earlier: Any) -> ColumnElement[float]:
    return func.date_part("epoch", later - earlier, type_=Float)


def _ms(later: Any, earlier: Any) -> ColumnElement[float]:
    return _seconds(later, earlier) * 1000


def _tokens_per_second() -> ColumnElement[float]:
    """Output tokens over the time from the first token to the end, as a job reports it."""
    seconds = _seconds(Job.finished_at, Job.first_token_at)
    return case(
        (and_(Job.output_tokens > 0, seconds > 0), cast(Job.output_tokens, Float) / seconds),
        else_=None,
    )


def _timing_expressions() -> dict[str, ColumnElement[float]]:
    return {
        "queue_ms": _ms(Job.started_at, Job.created_at),
        "ttft_ms": _ms(Job.first_token_at, Job.created_at),
        "duration_ms": _ms(Job.finished_at, Job.created_at),
        "tokens_per_second": _tokens_per_second(),
    }


# What each group field is in the jobs table; `day` is the UTC day of creation.
GROUP_COLUMNS: dict[str, SQLColumnExpression[Any]] = {
    "model": Job.model,
    "key": Job.api_key_id,
    "user": Job.user,
    # A literal, not a parameter: the GROUP BY must repeat the very same expression.
    "day": cast(func.timezone(literal_column("'UTC'"), Job.created_at), Date),
}
_ENDS = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.expired)


def days_scope(tenant: str, spans: Sequence[tuple[date, date]]) -> ColumnElement[bool]:
    """The tenant's counted jobs created on the days of `spans` (inclusive first/last days)."""
    return and_(
        Job.tenant == tenant,
        Job.judge_of.is_(None),
        or_(
            *(
                and_(Job.created_at >= _midnight(a), Job.created_at < _midnight(b, 1))
                for a, b in spans
            )
        ),
    )


def _midnight(day: date, after: int = 0) -> datetime:
    return datetime.combine(day + timedelta(days=after), time(), UTC)


def figure_columns() -> list[ColumnElement[Any]]:
    """Counts, tokens, cost, cache hits and the timings' [p50, p95, p99] of a group's jobs."""
    fractions = literal(list(PERCENTILES), ARRAY(Float))
    return [
        func.count().label("jobs"),
        *(func.count().filter(Job.status == s.value).label(s.value) for s in _ENDS),
        func.coalesce(func.sum(Job.input_tokens), 0).label("input_tokens"),
        func.coalesce(func.sum(Job.output_tokens), 0).label("output_tokens"),
        func.coalesce(func.sum(Job.cost_usd), 0).label("cost_usd"),
        func.count().filter(Job.cached).label("cache_hits"),
        *(
            func.percentile_cont(fractions).within_group(expression).label(name)
            for name, expression in _timing_expressions().items()
        ),
    ]


def marks_per_job(scope: ColumnElement[bool]) -> Subquery:
    """Thumbs up and down, and the sum and count of judge scores, of each job in `scope`."""
    marks = union_all(
        select(
            Feedback.job_id,
            case((Feedback.rating > 0, 1), else_=0).label("up"),
            case((Feedback.rating < 0, 1), else_=0).label("down"),
            literal(None, Integer).label("score"),
        ),
        select(Evaluation.job_id, literal(0), literal(0), cast(Evaluation.score, Integer)).where(
            Evaluation.score.is_not(None)
        ),
    ).subquery("marks")
    return (
        select(
            marks.c.job_id,
            func.sum(marks.c.up).label("up"),
            func.sum(marks.c.down).label("down"),
            func.sum(marks.c.score).label("score_sum"),
            func.count(marks.c.score).label("scores"),
        )
        .where(marks.c.job_id.in_(select(Job.id).where(scope)))
        .group_by(marks.c.job_id)
        .subquery("per_job")
    )


def select_stats(
    scope: ColumnElement[bool], groups: Sequence[Any], group_clause: Sequence[Any]
) -> Select[Any]:
    """Every figure of each group of the jobs in `scope`, in one pass over them."""
    per_job = marks_per_job(scope)
    return (
        select(
            *groups,
            *figure_columns(),
            func.coalesce(func.sum(per_job.c.up), 0).label("feedback_up"),
            func.coalesce(func.sum(per_job.c.down), 0).label("feedback_down"),
            func.coalesce(func.sum(per_job.c.score_sum), 0).label("judge_score_sum"),
            func.coalesce(func.sum(per_job.c.scores), 0).label("judge_scores"),
        )
        .select_from(Job)
        .outerjoin(per_job, per_job.c.job_id == Job.id)
        .where(scope)
        .group_by(*group_clause)
    )


# -- reading ---------------------------------------------------------------------------------


async def read_stats(session: AsyncSession, query: StatsQuery) -> list[StatsRow]:
    """The query's rows, one per group (exactly one when nothing is grouped), in order.

    Rows that are each one day (grouped by day, or a one-day range) come from the daily
    rollup for the days it holds fresh; every other day is read from the jobs themselves.
    """
    await session.execute(TUNING)
    rows: list[StatsRow] = []
    live = query.days
    if "day" in query.group_by or len(query.days) == 1:
        fresh = await _fresh_days(session, query)
        rows += await _rolled_up(session, query, fresh)
        live = [day for day in query.days if day not in fresh]
    if live:
        rows += await _read_live(session, query, spans_of(live))
    if not query.group_by and not rows:
        rows.append(StatsRow(timings={name: Quantiles(None, None, None) for name in TIMINGS}))
    if "key" in query.group_by:
        await _name_keys(session, rows)
    rows.sort(key=lambda row: _order(query.group_by, row))
    return rows


def spans_of(days: Sequence[date]) -> list[tuple[date, date]]:
    """Sorted days as runs of consecutive days (first, last)."""
    spans: list[tuple[date, date]] = []
    for day in sorted(days):
        if spans and spans[-1][1] + timedelta(days=1) == day:
            spans[-1] = (spans[-1][0], day)
        else:
            spans.append((day, day))
    return spans


async def _read_live(
    session: AsyncSession, query: StatsQuery, spans: list[tuple[date, date]]
) -> list[StatsRow]:
    groups: list[Label[Any]] = [GROUP_COLUMNS[name].label(name) for name in query.group_by]
    statement = select_stats(days_scope(query.tenant, spans), groups, groups)
    return [_row(query.group_by, found._mapping) for found in await session.execute(statement)]


def grouping_of(group_by: Sequence[str]) -> int:
    """The rollup's `grouping` bits for a grouping: model 1, key 2, user 4."""
    return sum(bit for name, bit in GROUPING_BITS.items() if name in group_by)


async def _fresh_days(session: AsyncSession, query: StatsQuery) -> set[date]:
    """The days of the range rolled up since their feedback or evaluations last changed."""
    changes = func.coalesce(StatsChange.changes, 0)
    found = await session.scalars(
        select(StatsDay.day)
        .outerjoin(
            StatsChange,
            and_(StatsChange.tenant == StatsDay.tenant, StatsChange.day == StatsDay.day),
        )
        .where(
            StatsDay.tenant == query.tenant,
            StatsDay.day.between(query.first_day, query.last_day),
            StatsDay.changes_seen == changes,
        )
    )
    return set(found)


async def _rolled_up(session: AsyncSession, query: StatsQuery, days: set[date]) -> list[StatsRow]:
    if not days:
        return []
    found = await session.execute(
        select(*StatsDaily.__table__.columns).where(
            StatsDaily.tenant == query.tenant,
            StatsDaily.day.in_(sorted(days)),
            StatsDaily.grouping == grouping_of(query.group_by),
        )
    )
    return [_row(query.group_by, {**r._mapping, "key": r.api_key_id}) for r in found]


def _row(group_by: Sequence[str], values: Any) -> StatsRow:
    cost: Decimal = values["cost_usd"]
    scores = int(values["judge_scores"])
    return StatsRow(
        model=values["model"] if "model" in group_by else None,
        key_id=values["key"] if "key" in group_by else None,
        user=values["user"] if "user" in group_by else None,
        day=values["day"] if "day" in group_by else None,
        jobs=values["jobs"],
        **{status.value: values[status.value] for status in _ENDS},
        input_tokens=int(values["input_tokens"]),
        output_tokens=int(values["output_tokens"]),
        cost_usd=round(float(cost), 8),
        cache_hits=values["cache_hits"],
        feedback_up=int(values["feedback_up"]),
        feedback_down=int(values["feedback_down"]),
        judge_score_avg=round(int(values["judge_score_sum"]) / scores, 3) if scores else None,
        timings={name: _quantiles(values[name]) for name in TIMINGS},
    )


def _quantiles(values: Sequence[float | None] | None) -> Quantiles:
    if values is None:
        return Quantiles(None, None, None)
    p50, p95, p99 = (None if v is None else round(v, 3) for v in values)
    return Quantiles(p50, p95, p99)


def _group_of(group_by: Sequence[str], row: StatsRow) -> tuple[Any, ...]:
    values = {"model": row.model, "key": row.key_id, "user": row.user, "day": row.day}
    return tuple(values[name] for name in group_by)


def _order(group_by: Sequence[str], row: StatsRow) -> tuple[Any, ...]:
    """Rows by their group fields in the order asked (keys by name), nulls last."""
    values = {"model": row.model, "key": row.key_name, "user": row.user, "day": row.day}
    return tuple((values[name] is None, str(values[name] or "")) for name in group_by)


async def _name_keys(session: AsyncSession, rows: list[StatsRow]) -> None:
    ids = {row.key_id for row in rows if row.key_id is not None}
    names: dict[uuid.UUID, str] = {}
    if ids:
        found = await session.execute(select(ApiKey.id, ApiKey.name).where(ApiKey.id.in_(ids)))
        names = dict(found.tuples().all())
    for row in rows:
        row.key_name = BOOTSTRAP_NAME if row.key_id is None else names.get(row.key_id)
