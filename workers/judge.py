"""The judge, run by `inferq beat`: score a sample of succeeded jobs with the models file's
[judge] model (docs/quality.md).

Each pass walks the jobs that ended since the last one (workers/passes.py), and
- for a sampled job (succeeded, not a cache hit, not itself a judge's job, its answer kept),
  makes the judge's job: an `evaluations` row (its `job_id` unique: a job is judged once,
  whichever beat gets there) names it while its score is null, and the job goes through the
  model's queue like any other, at batch priority;
- for each evaluation still pending whose judge's job has ended (however late its end was
  committed), reads the reply into it: a score and a rationale, or the reason there is none
  (an unreadable reply, a failed job), `judged_at` set either way, so nothing is retried for
  ever.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, Table, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, aliased

from inferq.judge import JUDGE_TENANT, Judged, Verdict, judge_job, parse, sampled
from inferq.metrics import JUDGE_SCORE, JUDGE_VERDICTS
from inferq.models import TERMINAL_STATUSES, Evaluation, Job, JobStatus
from inferq.queue import Enqueue
from inferq.registry import ModelSpec
from inferq.routing import JudgeTable
from workers.context import WorkerContext
from workers.passes import Mark, ended_pages, read_mark, save_mark, start_periodic

log = logging.getLogger("inferq.judge")

_jobs: Table = Job.__table__  # type: ignore[assignment]
_evaluations: Table = Evaluation.__table__  # type: ignore[assignment]

PAGE = 1000  # ended jobs read per query
MAX_PAGES = 20  # per pass
# A job ended this long ago at least: its end is committed (finishing is one statement).
SETTLE_SECONDS = 2.0
# With no mark in Redis (a first pass, a new Redis), the jobs that ended this long ago.
LOOKBACK = timedelta(hours=1)
MARK = "judge_until"


@dataclass(frozen=True, slots=True)
class JudgeReport:
    started: int = 0  # judge's jobs made
    judged: int = 0  # verdicts recorded


def judge_pass(ctx: WorkerContext) -> JudgeReport:
    """One pass over the jobs that ended since the last; nothing without a [judge] table."""
    table = ctx.registry.judge
    if table is None:
        return JudgeReport()
    spec = ctx.registry.get(table.model)
    assert spec is not None  # the registry checked the [judge] table's model
    with ctx.sessions.begin() as session:
        now: datetime = session.scalar(select(func.now()))
    until = now - timedelta(seconds=SETTLE_SECONDS)
    after = read_mark(ctx, MARK) or Mark(until - LOOKBACK, uuid.UUID(int=0))
    query = select(
        Job.id,
        Job.finished_at,
        Job.status,
        Job.tenant,
        Job.cached,
        Job.judge_of,
        # Retention clears the output; input redaction (INFERQ_REDACT_INPUTS) keeps it, and
        # the judge then reads the answer alone.
        Job.output.is_not(None).label("answer_kept"),
    )
    started = 0
    for page in ended_pages(ctx, query, after, until, PAGE, MAX_PAGES):
        started += _start_judging(ctx, table, spec, [r.id for r in page if _wanted(r, table)])
        save_mark(ctx, MARK, Mark(page[-1].finished_at, page[-1].id))
    return JudgeReport(started, _record_verdicts(ctx, _ended_judges(ctx)))


def _wanted(row: Row[Any], table: JudgeTable) -> bool:
    """A job the judge scores: a succeeded answer that is new (not replayed from the cache),
    still kept, not a judge's own, and sampled."""
    return (
        row.status == JobStatus.succeeded
        and row.judge_of is None
        and not row.cached
        and row.answer_kept
        and row.tenant != JUDGE_TENANT
        and sampled(row.id, table.sample_rate)
    )


# ------------------------------------------------------------------------- starting


def _start_judging(
    ctx: WorkerContext, table: JudgeTable, spec: ModelSpec, ids: list[uuid.UUID]
) -> int:
    if not ids:
        return 0
    with ctx.sessions.begin() as session:
        rows = _claim(session, ids, spec.name)
        judges = [judge_job(judged, table, spec, ctx.settings.redact_inputs) for judged in rows]
        if judges:
            # Core statements, several rows each: one round trip for the batch.
            session.execute(insert(_jobs), judges)
            session.execute(
                update(_evaluations)
                .where(_evaluations.c.job_id == bindparam("judged"))
                .values(judge_job_id=bindparam("judge")),
                [{"judged": j["judge_of"], "judge": j["id"]} for j in judges],
            )
    queue = ctx.registry.queue_of(spec.name)
    ctx.enqueuer.enqueue(ctx.broker, [Enqueue(str(j["id"]), queue, "batch") for j in judges])
    return len(judges)


def _claim(session: Session, ids: list[uuid.UUID], judge_model: str) -> list[Judged]:
    """The jobs among `ids` that no one judges yet, each now marked with its evaluation row
    (in this transaction: with its judge's job it is committed, or not at all)."""
    claimed = session.scalars(
        pg_insert(Evaluation)
        .values([{"job_id": job_id, "judge_model": judge_model} for job_id in ids])
        .on_conflict_do_nothing(index_elements=["job_id"])
        .returning(Evaluation.job_id)
    ).all()
    if not claimed:
        return []
    texts = session.execute(
        select(Job.id, Job.model, Job.input, Job.output).where(Job.id.in_(claimed))
    ).all()
    return [Judged(r.id, r.model, r.input, r.output or "") for r in texts]


# ------------------------------------------------------------------------- verdicts


def _ended_judges(ctx: WorkerContext) -> Sequence[Row[Any]]:
    """Ended judge's jobs whose evaluation is still pending, a page at most (the pending
    evaluations are few: those of the judge's jobs in flight, by a partial index)."""
    with ctx.sessions.begin() as session:
        return session.execute(
            select(Job.id, Job.judge_of)
            .join(Evaluation, Evaluation.judge_job_id == Job.id)
            .where(Evaluation.judged_at.is_(None), Job.status.in_(TERMINAL_STATUSES))
            .order_by(Evaluation.id)
            .limit(PAGE)
        ).all()


def _record_verdicts(ctx: WorkerContext, rows: Sequence[Row[Any]]) -> int:
    """Read each ended judge's job into its evaluation (once: only one still unjudged)."""
    if not rows:
        return 0
    judge, judged = aliased(Job), aliased(Job)
    with ctx.sessions.begin() as session:
        pending = session.execute(
            select(
                Evaluation.id,
                judged.model,
                judge.status,
                judge.output,
                judge.error_type,
                judge.error_message,
            )
            .join(judge, judge.id == Evaluation.judge_job_id)
            .join(judged, judged.id == Evaluation.job_id)
            .where(
                Evaluation.job_id.in_([r.judge_of for r in rows]),
                Evaluation.judge_job_id.in_([r.id for r in rows]),
                Evaluation.judged_at.is_(None),
            )
        ).all()
        recorded = [row for row in pending if _record(session, row)]
    for row in recorded:
        _count(row.model, _verdict(row), row.status)
    return len(recorded)


def _record(session: Session, row: Row[Any]) -> bool:
    """Write the verdict of `row`'s judge's job; False if another beat did first (its row
    was read unjudged by both, and its update re-checked the row once the other's committed)."""
    verdict = _verdict(row)
    written = session.scalar(
        update(Evaluation)
        .where(Evaluation.id == row.id, Evaluation.judged_at.is_(None))
        .values(
            score=verdict.score,
            rationale=verdict.rationale,
            error=verdict.error,
            judged_at=func.now(),
        )
        .returning(Evaluation.id),
        execution_options={"synchronize_session": False},
    )
    return written is not None


def _verdict(row: Row[Any]) -> Verdict:
    if row.status != JobStatus.succeeded:
        why = f": {row.error_type}: {row.error_message}" if row.error_type else ""
        return Verdict(None, None, f"the judge's job ended {row.status}{why}")
    return parse(row.output or "")


def _count(model: str, verdict: Verdict, status: str) -> None:
    if verdict.score is not None:
        JUDGE_SCORE.labels(model).observe(verdict.score)
        JUDGE_VERDICTS.labels(model, "scored").inc()
    else:
        outcome = "unparseable" if status == JobStatus.succeeded else "failed"
        JUDGE_VERDICTS.labels(model, outcome).inc()
        log.warning("judge: no score for a %s job: %s", model, verdict.error)


def start_judge(ctx: WorkerContext) -> None:
    start_periodic(
        ctx, "judge", lambda: ctx.settings.judge_interval_seconds, lambda: judge_pass(ctx)
    )
