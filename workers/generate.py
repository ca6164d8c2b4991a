"""The `inferq.generate` task body: claim, stream from the backend, publish, finish once."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from inferq import lifecycle
from inferq.events import Event, EventType, terminal_events, usage
from inferq.lifecycle import Claim, Outcome
from inferq.models import JobStatus
from inferq.queue import ENQUEUED_KEY
from inferq.registry import ModelSpec
from workers.backends import (
    BackendError,
    FatalBackendError,
    GenerationRequest,
    RetryableBackendError,
    open_stream,
)
from workers.context import WorkerContext
from workers.observe import record_claim, record_finish
from workers.publisher import TokenPublisher

log = logging.getLogger("inferq.worker")


class ClaimLost(Exception):
    """Another worker took the job over (our lease expired); stop without finishing."""


def run_job(ctx: WorkerContext, job_id: str) -> None:
    """Run one delivery of a job; a duplicate or late delivery returns without effect."""
    ctx.broker.zrem(ENQUEUED_KEY, job_id)
    with ctx.autocommit.connect() as conn:
        claim = lifecycle.claim(
            conn,
            uuid.UUID(job_id),
            ctx.name,
            ctx.settings.lease_seconds,
            ctx.settings.max_attempts,
        )
    if claim is None:
        log.info("job not claimable, skipping", extra={"job_id": job_id})
        return
    record_claim(claim, datetime.now(UTC))
    spec = ctx.registry.get(claim.model)
    generation = Generation(ctx, claim, spec)
    if spec is None:
        generation.finish(_failure("unknown_model", f"model {claim.model!r} is not served"))
        return
    generation.run(spec)


def _failure(type_: str, message: str, output: str = "") -> Outcome:
    return Outcome(JobStatus.failed, output=output, error_type=type_, error_message=message)


def request_of(claim: Claim) -> GenerationRequest:
    params = claim.params
    return GenerationRequest(
        prompt=claim.input.get("prompt"),
        messages=claim.input.get("messages"),
        max_tokens=params["max_tokens"],
        temperature=params.get("temperature"),
        top_p=params.get("top_p"),
        stop=params.get("stop") or [],
        seed=params.get("seed"),
    )


class Generation:
    """One claimed attempt at a job, with in-attempt retries of the backend call."""

    def __init__(self, ctx: WorkerContext, claim: Claim, spec: ModelSpec | None) -> None:
        self.ctx = ctx
        self.claim = claim
        self.spec = spec
        settings = ctx.settings
        self.publisher = TokenPublisher(
            ctx.publish_script,
            str(claim.job_id),
            maxlen=settings.stream_maxlen,
            ttl=settings.stream_ttl_seconds,
            pace=ctx.pace,
            flush_max_tokens=settings.flush_max_tokens,
        )
        self.restarts = 0
        self.parts: list[str] = []
        self.emitted = claim.attempt > 1  # an earlier attempt may have streamed tokens

    def run(self, spec: ModelSpec) -> None:
        self.ctx.leases.hold(self.claim.token)
        try:
            self._start_events()
            with self.ctx.pace.streaming():
                outcome = self._with_retries(spec)
            self.finish(outcome)
        except ClaimLost:
            log.warning("lease lost, another worker owns the job", extra=self._log())
        finally:
            self.ctx.leases.release(self.claim.token)

    def _start_events(self) -> None:
        events = [Event.make(EventType.status, status=JobStatus.running.value)]
        if self.emitted:
            events.insert(0, Event.make(EventType.reset, attempt=self.claim.attempt))
        self.publisher.send(events)

    def _with_retries(self, spec: ModelSpec) -> Outcome:
        settings = self.ctx.settings
        retrying = Retrying(
            retry=retry_if_exception_type(RetryableBackendError),
            stop=stop_after_attempt(settings.backend_retries + 1),
            wait=wait_exponential_jitter(initial=settings.backend_retry_base_seconds, max=10),
            before_sleep=self._before_retry,
            reraise=True,
        )
        try:
            return retrying(self._attempt, spec)
        except BackendError as exc:
            # Keep what the readers were shown, so the stream and the stored output agree.
            return _failure(exc.type, exc.message, output="".join(self.parts))

    def _before_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("backend error, retrying: %s", exc, extra=self._log())
        if self.emitted:
            self.restarts += 1
            self.publisher.send(
                [Event.make(EventType.reset, attempt=self.claim.attempt + self.restarts)]
            )
            self.emitted = False

    def _attempt(self, spec: ModelSpec) -> Outcome:
        stream = open_stream(
            spec, request_of(self.claim), self.ctx.settings.backend_timeout_seconds
        )
        deadline = time.monotonic() + self.ctx.settings.job_deadline_seconds
        parts = self.parts = []
        first_token_at: datetime | None = None
        try:
            for delta in stream:
                if first_token_at is None:
                    first_token_at = datetime.now(UTC)
                    self.emitted = True
                parts.append(delta)
                if self.publisher.add_token(delta):
                    return self._cancelled(parts, first_token_at)
                if self.ctx.leases.lost(self.claim.token):
                    raise ClaimLost
                if time.monotonic() > deadline:
                    raise FatalBackendError(
                        "deadline_exceeded", "the generation ran past its deadline"
                    )
        finally:
            stream.close()
        completion = stream.completion
        output_tokens = (
            completion.output_tokens if completion.output_tokens is not None else len(parts)
        )
        input_tokens = completion.input_tokens or 0
        return Outcome(
            JobStatus.succeeded,
            output="".join(parts),
            finish_reason=completion.finish_reason or "stop",
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=spec.cost_usd(input_tokens, output_tokens),
            first_token_at=first_token_at,
        )

    def _cancelled(self, parts: list[str], first_token_at: datetime | None) -> Outcome:
        # The flush that saw the flag carried every pending token: all of `parts` was published.
        return Outcome(
            JobStatus.cancelled,
            output="".join(parts),
            finish_reason="cancelled",
            output_tokens=len(parts),
            first_token_at=first_token_at,
        )

    def finish(self, outcome: Outcome) -> None:
        if outcome.status is not JobStatus.cancelled:
            self.publisher.flush()
        with self.ctx.autocommit.connect() as conn:
            recorded = lifecycle.finish(conn, self.claim, outcome)
        if not recorded:
            log.warning("finish refused: job already ended or taken over", extra=self._log())
            return
        self.publisher.send(self._closing_events(outcome), final=True)
        record_finish(self.claim, outcome, datetime.now(UTC))
        log.info("job finished", extra={**self._log(), "status": outcome.status.value})

    def _closing_events(self, outcome: Outcome) -> list[Event]:
        counts = usage(outcome.input_tokens, outcome.output_tokens, outcome.cost_usd)
        error = (
            (outcome.error_type or "error", outcome.error_message or "")
            if outcome.status is JobStatus.failed
            else None
        )
        return terminal_events(outcome.status.value, outcome.finish_reason, counts, error)

    def _log(self) -> dict[str, Any]:
        return {"job_id": str(self.claim.job_id), "attempt": self.claim.attempt}
