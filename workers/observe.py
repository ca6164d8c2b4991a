"""Worker-side metrics for a finished job."""

from __future__ import annotations

from datetime import datetime

from inferq import metrics
from inferq.lifecycle import Claim, Outcome


def record_finish(claim: Claim, outcome: Outcome, now: datetime) -> None:
    model = claim.model
    metrics.JOBS_FINISHED.labels(model, outcome.status.value).inc()
    metrics.DURATION.labels(model).observe((now - claim.created_at).total_seconds())
    if outcome.first_token_at is not None:
        metrics.TTFT.labels(model).observe(
            (outcome.first_token_at - claim.created_at).total_seconds()
        )
    if outcome.input_tokens:
        metrics.INPUT_TOKENS.labels(model).inc(outcome.input_tokens)
    if outcome.output_tokens:
        metrics.OUTPUT_TOKENS.labels(model).inc(outcome.output_tokens)
    if outcome.cost_usd:
        metrics.COST.labels(model).inc(outcome.cost_usd)
    if outcome.error_type:
        metrics.BACKEND_ERRORS.labels(model, outcome.error_type).inc()


def record_claim(claim: Claim, started: datetime) -> None:
    metrics.QUEUE_WAIT.labels(claim.model).observe((started - claim.created_at).total_seconds())
