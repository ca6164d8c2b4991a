"""SQLAlchemy 2 typed ORM models: the jobs table is the source of truth."""

from __future__ import annotations

import enum
import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal, get_args

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, datetime: DateTime(timezone=True)}


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"

    @property
    def terminal(self) -> bool:
        """Terminal states never change."""
        return self not in (JobStatus.queued, JobStatus.running)


# The one set of terminal states, in JobStatus's order; every other spelling derives from it.
TERMINAL_STATUSES: tuple[str, ...] = tuple(s.value for s in JobStatus if s.terminal)
# The same as a type, for request schemas (a webhook's events); checked against JobStatus.
JobEnd = Literal["succeeded", "failed", "cancelled", "expired"]
if get_args(JobEnd) != TERMINAL_STATUSES:
    raise AssertionError(f"JobEnd {get_args(JobEnd)} is not JobStatus's {TERMINAL_STATUSES}")
WEBHOOK_PENDING = "webhook IS NOT NULL AND NOT webhook_done AND status IN ({})".format(
    ", ".join(f"'{status}'" for status in TERMINAL_STATUSES)
)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    daily_budget_usd: Mapped[Decimal | None] = mapped_column(Numeric(12, 4))
    max_queued: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    revoked_at: Mapped[datetime | None]


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # One job per (key, Idempotency-Key); the bootstrap key (no id) has its keys too.
        Index(
            "uq_jobs_idempotency",
            "api_key_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
            postgresql_nulls_not_distinct=True,
        ),
        Index("ix_jobs_tenant_id", "tenant", "id"),
        Index(
            "ix_jobs_sweep",
            "status",
            "lease_expires_at",
            postgresql_where=text("status IN ('queued', 'running')"),
        ),
        # A queued job's position: its model's queued jobs by priority, then id.
        Index(
            "ix_jobs_queued_position",
            "model",
            "priority",
            "id",
            postgresql_where=text("status = 'queued'"),
        ),
        # Exactly the jobs whose webhook is due or waiting for its next try.
        Index(
            "ix_jobs_webhook_pending",
            "webhook_next_at",
            postgresql_where=text(WEBHOOK_PENDING),
        ),
        # A tenant's jobs by creation time, for /v1/stats (a judge's jobs never count there).
        Index("ix_jobs_stats", "tenant", "created_at", postgresql_where=text("judge_of IS NULL")),
        # Ended jobs in the order they ended: beat's passes over them (the judge, retention,
        # closing streams) read a range of it, not the whole table.
        Index(
            "ix_jobs_finished",
            "finished_at",
            "id",
            postgresql_where=text("finished_at IS NOT NULL"),
        ),
    )

    # Time-ordered UUIDv7: ids sort by creation, which the cursor pagination relies on.
    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(200))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("api_keys.id", ondelete="SET NULL")
    )
    requested_model: Mapped[str] = mapped_column(String(200))  # a model's name, or `auto`
    model: Mapped[str] = mapped_column(String(200))  # the model it runs on
    user: Mapped[str | None] = mapped_column(String(200))  # the caller's end user
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)
    priority: Mapped[str] = mapped_column(String(16), default="interactive")
    input: Mapped[dict[str, Any]]
    params: Mapped[dict[str, Any]]
    output: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    input_tokens: Mapped[int | None]
    output_tokens: Mapped[int | None]
    cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(14, 8))
    cached: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Messages left out, oldest first, so that the input fit the model's context window.
    dropped_messages: Mapped[int | None]
    attempts: Mapped[int] = mapped_column(SmallInteger, default=0, server_default=text("0"))
    worker: Mapped[str | None] = mapped_column(String(200))
    claim_token: Mapped[uuid.UUID | None] = mapped_column(UUID)
    lease_expires_at: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    webhook: Mapped[dict[str, Any] | None]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime | None]
    first_token_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    deadline_at: Mapped[datetime | None]
    # Webhook delivery: when the next try is due (null: as soon as the job ends),
    # and whether delivery is over (delivered, given up, or not wanted for this end).
    webhook_next_at: Mapped[datetime | None]
    webhook_done: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # A judge's job names the job it scores; such jobs count in no tenant's stats or budget.
    judge_of: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("jobs.id", ondelete="CASCADE")
    )
    # When retention or redaction cleared this job's texts (its figures stay).
    redacted_at: Mapped[datetime | None]


class TenantSecret(Base):
    """A tenant's webhook signing secret (`whsec_…`), made on first use."""

    __tablename__ = "tenant_secrets"

    tenant: Mapped[str] = mapped_column(String(200), primary_key=True)
    secret: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class WebhookDelivery(Base):
    """One try at delivering a job's webhook."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (UniqueConstraint("job_id", "attempt"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(SmallInteger)
    status_code: Mapped[int | None] = mapped_column(SmallInteger)
    error: Mapped[str | None] = mapped_column(Text)
    next_try_at: Mapped[datetime | None]  # null: delivered, or given up
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Feedback(Base):
    """A key's rating of a job's answer; the latest from a key wins."""

    __tablename__ = "feedback"
    __table_args__ = (
        Index(
            "uq_feedback_job_key",
            "job_id",
            "api_key_id",
            unique=True,
            postgresql_nulls_not_distinct=True,
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("jobs.id", ondelete="CASCADE"))
    # The key that rated (null: the bootstrap key, which has no row).
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("api_keys.id", ondelete="SET NULL")
    )
    rating: Mapped[int] = mapped_column(SmallInteger)  # 1 or -1
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Evaluation(Base):
    """A judge's score of a job: 1-5 with a rationale, or why its reply could not be read."""

    __tablename__ = "evaluations"
    __table_args__ = (
        # The evaluations waiting for their judge's job: few, read by every judge pass.
        Index(
            "ix_evaluations_pending",
            "judge_job_id",
            postgresql_where=text("judged_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("jobs.id", ondelete="CASCADE"), unique=True
    )
    judge_job_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("jobs.id", ondelete="SET NULL")
    )
    judge_model: Mapped[str] = mapped_column(String(200))
    score: Mapped[int | None] = mapped_column(SmallInteger)  # null until judged, or unreadable
    rationale: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)  # the judge's reply could not be parsed
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    judged_at: Mapped[datetime | None]


class StatsDaily(Base):
    """A tenant's figures of one closed UTC day for one group: the rollup behind /v1/stats.

    `grouping` says which of model (1), key (2) and user (4) the row is grouped by; the
    others are null. The timings are [p50, p95, p99] over that day's jobs of the group.
    """

    __tablename__ = "stats_daily"
    __table_args__ = (
        Index(
            "uq_stats_daily_group",
            "tenant",
            "day",
            "grouping",
            "model",
            "api_key_id",
            "user",
            unique=True,
            postgresql_nulls_not_distinct=True,
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(200))
    day: Mapped[date]
    grouping: Mapped[int] = mapped_column(SmallInteger)
    model: Mapped[str | None] = mapped_column(String(200))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID)  # null: the bootstrap key
    user: Mapped[str | None] = mapped_column(String(200))
    jobs: Mapped[int]
    succeeded: Mapped[int]
    failed: Mapped[int]
    cancelled: Mapped[int]
    expired: Mapped[int]
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(20, 8))
    cache_hits: Mapped[int]
    feedback_up: Mapped[int]
    feedback_down: Mapped[int]
    judge_score_sum: Mapped[int]
    judge_scores: Mapped[int]
    queue_ms: Mapped[list[float] | None] = mapped_column(ARRAY(Float))
    ttft_ms: Mapped[list[float] | None] = mapped_column(ARRAY(Float))
    duration_ms: Mapped[list[float] | None] = mapped_column(ARRAY(Float))
    tokens_per_second: Mapped[list[float] | None] = mapped_column(ARRAY(Float))


class StatsDay(Base):
    """A (tenant, day) rolled up into stats_daily, as of its `changes` count then."""

    __tablename__ = "stats_days"

    tenant: Mapped[str] = mapped_column(String(200), primary_key=True)
    day: Mapped[date] = mapped_column(primary_key=True)
    changes_seen: Mapped[int] = mapped_column(BigInteger)
    rolled_up_at: Mapped[datetime] = mapped_column(server_default=func.now())


class StatsChange(Base):
    """How often feedback or evaluations of a (tenant, day)'s jobs changed, counted by a
    trigger on those tables: a rollup older than the count is stale."""

    __tablename__ = "stats_changes"

    tenant: Mapped[str] = mapped_column(String(200), primary_key=True)
    day: Mapped[date] = mapped_column(primary_key=True)
    changes: Mapped[int] = mapped_column(BigInteger)
