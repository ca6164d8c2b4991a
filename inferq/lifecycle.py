"""The job lifecycle in Postgres (DESIGN §4): claim with a lease, extend it, finish once."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from inferq.models import Job, JobStatus


@dataclass(frozen=True, slots=True)
class Claim:
    """A worker's hold on a running job; only the holder of `token` may finish it."""

    job_id: uuid.UUID
    token: uuid.UUID
    attempt: int
    model: str
    input: dict[str, Any]
    params: dict[str, Any]
    created_at: datetime
    deadline_at: datetime | None


@dataclass(frozen=True, slots=True)
class Outcome:
    status: JobStatus
    output: str = ""
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    error_type: str | None = None
    error_message: str | None = None
    first_token_at: datetime | None = None


def lease_until(seconds: float) -> Any:
    return func.now() + timedelta(seconds=seconds)


def claim(
    session: Session, job_id: uuid.UUID, worker: str, lease_seconds: float, max_attempts: int
) -> Claim | None:
    """Take a queued job, or a running one whose lease expired; None if someone else has it."""
    claimable = or_(
        Job.status == JobStatus.queued,
        and_(Job.status == JobStatus.running, Job.lease_expires_at < func.now()),
    )
    token = uuid.uuid4()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable, Job.attempts < max_attempts)
        .values(
            status=JobStatus.running,
            attempts=Job.attempts + 1,
            worker=worker,
            claim_token=token,
            lease_expires_at=lease_until(lease_seconds),
            started_at=func.coalesce(Job.started_at, func.now()),
        )
        .returning(Job.attempts, Job.model, Job.input, Job.params, Job.created_at, Job.deadline_at)
    ).first()
    if row is None:
        return None
    return Claim(
        job_id,
        token,
        row.attempts,
        row.model,
        row.input,
        row.params,
        row.created_at,
        row.deadline_at,
    )


def _held(claim_: Claim) -> Any:
    return and_(
        Job.id == claim_.job_id,
        Job.status == JobStatus.running,
        Job.claim_token == claim_.token,
    )


def finish(session: Session, claim_: Claim, outcome: Outcome) -> bool:
    """Record the end of a job; False when the claim was lost or the job already ended."""
    values: dict[str, Any] = {
        "status": outcome.status,
        "output": outcome.output,
        "finish_reason": outcome.finish_reason,
        "input_tokens": outcome.input_tokens,
        "output_tokens": outcome.output_tokens,
        "cost_usd": None if outcome.cost_usd is None else Decimal(str(outcome.cost_usd)),
        "error_type": outcome.error_type,
        "error_message": outcome.error_message,
        "finished_at": func.now(),
        "lease_expires_at": None,
    }
    if outcome.first_token_at is not None:
        values["first_token_at"] = outcome.first_token_at
    result = session.execute(update(Job).where(_held(claim_)).values(**values))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def is_terminal(session: Session, job_id: uuid.UUID) -> bool:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return status is None or JobStatus(status).terminal
