"""The body of `GET /v1/stats`."""

from __future__ import annotations

import uuid
from datetime import date

from pydantic import BaseModel, Field

from inferq.stats import Quantiles, StatsRow


class Percentiles(BaseModel):
    """p50, p95 and p99 over the group's jobs that have the figure (null: none has)."""

    p50: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, quantiles: Quantiles) -> Percentiles:
        return cls(p50=quantiles.p50, p95=quantiles.p95, p99=quantiles.p99)


class FeedbackCounts(BaseModel):
    up: int
    down: int


class KeyRef(BaseModel):
    """A key of the tenant; the bootstrap key has no row: null id, name "bootstrap"."""

    id: uuid.UUID | None
    name: str | None


class StatsRowOut(BaseModel):
    """One group's figures. The group fields (`model`, `key`, `user`, `day`) are present
    only when grouped by; `user` is null for jobs submitted without one."""

    model: str | None = None
    key: KeyRef | None = None
    user: str | None = None
    day: date | None = None
    jobs: int
    succeeded: int
    failed: int
    cancelled: int
    expired: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    cache_hits: int
    cache_hit_rate: float = Field(description="cache_hits ÷ jobs")
    error_rate: float = Field(description="failed ÷ jobs")
    feedback: FeedbackCounts
    judge_score_avg: float | None = Field(description="the judge's mean score, 1-5")
    queue_ms: Percentiles
    ttft_ms: Percentiles
    duration_ms: Percentiles
    tokens_per_second: Percentiles

    @classmethod
    def of(cls, row: StatsRow, group_by: tuple[str, ...]) -> StatsRowOut:
        groups: dict[str, object] = {}
        if "model" in group_by:
            groups["model"] = row.model
        if "key" in group_by:
            groups["key"] = KeyRef(id=row.key_id, name=row.key_name)
        if "user" in group_by:
            groups["user"] = row.user
        if "day" in group_by:
            groups["day"] = row.day
        timings = {name: Percentiles.of(q) for name, q in row.timings.items()}
        return cls.model_validate(
            {
                **groups,
                "jobs": row.jobs,
                "succeeded": row.succeeded,
                "failed": row.failed,
                "cancelled": row.cancelled,
                "expired": row.expired,
                "input_tokens": row.input_tokens,
                "output_tokens": row.output_tokens,
                "cost_usd": row.cost_usd,
                "cache_hits": row.cache_hits,
                "cache_hit_rate": row.cache_hit_rate,
                "error_rate": row.error_rate,
                "feedback": FeedbackCounts(up=row.feedback_up, down=row.feedback_down),
                "judge_score_avg": row.judge_score_avg,
                **timings,
            }
        )


class StatsList(BaseModel):
    data: list[StatsRowOut]
