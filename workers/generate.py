"""The `inferq.generate` task body: claim, stream from the backend, publish, finish once."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from celery.exceptions import Reject
from huggingface_hub.inference._common import RequestParameters
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from inferq import cache, lifecycle, limits, metrics
from inferq.events import Event, finish_reason_of
from inferq.lifecycle import Claim, Outcome
from inferq.models import JobStatus
from inferq.protocol import ResetData, StatusData
from inferq.queue import ENQUEUED_KEY, Enqueue
from inferq.registry import ModelSpec
from inferq.settings import Settings
from workers.backends import (
    BackendError,
    Completion,
    FatalBackendError,
    GenerationRequest,
    RetryableBackendError,
    open_stream,
    sse,
)
from workers.backends.base import BackendStream
from workers.backends.errors import unexpected
from workers.backends.tgi import ClientStream
from workers.context import WorkerContext
from workers.engine import LoopEnd, StreamEngine
from workers.expiry import expire_job
from workers.interrupts import Interrupt, Interrupted, Reason
from workers.observe import record_claim, record_finish
from workers.publisher import Also, ClaimLost, RedisUnavailable, TokenPublisher

log = logging.getLogger("inferq.worker")

RUN_DEADLINE_MESSAGE = "the generation ran past its deadline"


def run_job(ctx: WorkerContext, job_id: str) -> None:
    """Run one delivery of a job; a duplicate or late delivery returns without effect."""
    if ctx.interrupts.shutting_down:
        # The worker is stopping: the message goes back to the queue, for another worker.
        raise Reject(requeue=True)
    # The job's enqueue mark (for the sweeper, which looks for queued jobs that lost their
    # message) goes once the job is no longer queued: with the claim's first write when the
    # claim holds, else now.
    try:
        claim = _claim(ctx, job_id)
    except lifecycle.Unreadable as exc:
        _unmark(ctx, job_id)
        log.error("%s", exc, extra={"job_id": job_id})
        Generation(ctx, exc.claim, None).finish(_failure("backend_error", str(exc)))
        return
    except Exception:
        # As if the delivery had not come: the sweeper finds the job queued without a mark.
        _unmark(ctx, job_id)
        raise
    if claim is None:
        _unmark(ctx, job_id)
        if not expire_job(ctx, job_id):
            _not_claimable(ctx, job_id)
        return
    record_claim(claim, datetime.now(UTC))
    spec = ctx.registry.get(claim.model)
    generation = Generation(ctx, claim, spec)
    if spec is None:
        _unmark(ctx, job_id)
        _count_start(ctx, claim.model)
        generation.finish(_failure("unknown_model", f"model {claim.model!r} is not served"))
        return
    generation.run(spec)


def _unmark(ctx: WorkerContext, job_id: str) -> None:
    """Best effort: a mark left behind is dropped by the sweeper in time."""
    try:
        ctx.broker.zrem(ENQUEUED_KEY, job_id)
    except Exception:
        log.warning("could not drop the job's enqueue mark", extra={"job_id": job_id})


def _count_start(ctx: WorkerContext, model: str) -> None:
    """For queued jobs' ETA (inferq.cache.starts_per_second); best effort."""
    try:
        cache.count_start(ctx.redis, model)
    except Exception:
        log.warning("could not count the job's start", extra={"model": model})


def _claim(ctx: WorkerContext, job_id: str) -> Claim | None:
    settings = ctx.settings
    return ctx.direct.claim(
        uuid.UUID(job_id), ctx.name, settings.lease_seconds, settings.max_attempts
    )


def _not_claimable(ctx: WorkerContext, job_id: str) -> None:
    """Ack a delivery that found no claimable row; a job the database lacks is an error."""
    with ctx.autocommit.connect() as conn:
        known = lifecycle.exists(conn, uuid.UUID(job_id))
    if known:
        log.info("job not claimable, skipping", extra={"job_id": job_id})
        return
    # Most likely another deployment's worker on the same Redis and queue names.
    metrics.WORKER_UNKNOWN_JOBS.inc()
    log.error(
        "job %s is not in this deployment's database, skipping", job_id, extra={"job_id": job_id}
    )


def _failure(type_: str, message: str) -> Outcome:
    return Outcome(JobStatus.failed, error_type=type_, error_message=message)


def request_of(claim: Claim) -> GenerationRequest:
    job_input, params = claim.input, claim.params
    messages = job_input.messages
    return GenerationRequest(
        prompt=job_input.prompt,
        messages=None if messages is None else [m.model_dump() for m in messages],
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        stop=params.stop or [],
        seed=params.seed,
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
            claim=claim,
            outage_s=settings.redis_outage_seconds,
        )
        self.restarts = 0
        self.parts: list[str] = []
        self.completion = Completion()  # the current backend call's counts, as it reports them
        self.emitted = claim.attempt > 1  # an earlier attempt may have streamed tokens
        self.interrupt = Interrupt(str(claim.job_id), _run_deadline(claim, settings))
        self.first_token_at: datetime | None = None  # of the current try, on the stream loop
        # Whether the stream loop ended the job (True), found it ended or taken over (False),
        # or left its end to this thread (None).
        self.finished_on_loop: bool | None = None
        self.started = time.monotonic()

    def run(self, spec: ModelSpec) -> None:
        log.info(
            "job %s started on %s",
            self.claim.job_id,
            spec.name,
            extra={**self._log(), "model": spec.name},
        )
        self.ctx.leases.hold(self.claim.token, str(self.claim.job_id))
        self.ctx.interrupts.watch(self.interrupt)
        try:
            self._start_events()
            with self.ctx.pace.streaming():
                outcome = self._with_retries(spec)
            self.finish(outcome)
        except ClaimLost:
            log.warning("lease lost, another worker owns the job", extra=self._log())
        except RedisUnavailable:
            # A Redis outage is no failure of the job: the lease lapses, the sweeper enqueues
            # the job again (unless it ended) and another attempt runs it once Redis is back.
            log.warning("Redis unreachable too long: attempt stopped", extra=self._log())
        except Interrupted:  # the worker is shutting down
            self._hand_back()
        except Exception as exc:
            self._fail_unexpectedly(exc)
        finally:
            self.ctx.interrupts.forget(self.interrupt)
            self.ctx.leases.release(self.claim.token)

    def _hand_back(self) -> None:
        """End this claim now and queue the job again, so that another worker restarts it at
        once (its readers get a `reset`) instead of after the lease lapses."""
        self.ctx.leases.release(self.claim.token)
        with self.ctx.autocommit.connect() as conn:
            released = lifecycle.release(conn, self.claim)
        if released is None:
            return
        model, priority = released
        queue = self.ctx.registry.queue_of(model)
        self.ctx.enqueuer.enqueue(
            self.ctx.broker, [Enqueue(str(self.claim.job_id), queue, priority)]
        )
        metrics.JOBS_RELEASED.labels(model).inc()
        log.warning("worker stopping: job handed back to the queue", extra=self._log())

    def _fail_unexpectedly(self, exc: Exception) -> None:
        """End the job once, rather than leave it running for the sweeper to retry into the
        same failure until it gives up on it as if its worker had died."""
        log.exception("generation failed unexpectedly", extra=self._log())
        error = unexpected(exc)
        try:
            self.finish(self._charged(_failure(error.type, error.message)))
        except ClaimLost:
            log.warning("lease lost, another worker owns the job", extra=self._log())

    def _start_events(self) -> None:
        """`status: running` (after a `reset` if an earlier attempt showed tokens), in one
        round trip with the job's start count, its enqueue mark's removal and, for a key with
        limits, its leaving the key's queued count: writes that all stood before the first
        token. With a stream loop they lead the stream's writes: the loop sends them as it
        opens the stream, beside other streams' writes (this thread does not wait for them);
        a stream read on this thread sends them before it is read."""
        events = [Event.of(StatusData(status=JobStatus.running))]
        if self.emitted:
            events.insert(0, Event.of(ResetData(attempt=self.claim.attempt)))
        ctx, claim = self.ctx, self.claim
        job_id, model = str(claim.job_id), claim.model
        together = ctx.broker is ctx.redis  # else the mark is in another Redis
        # It left `queued` (a later attempt's claim takes a running job: it had left).
        dequeue = claim.limited and claim.attempt == 1

        def bookkeeping(pipe: Any) -> None:
            cache.count_start_in(pipe, model)
            if together:
                pipe.zrem(ENQUEUED_KEY, job_id)
            if dequeue:
                limits.dequeue_in(pipe, job_id)

        self.publisher.lead(events, also=bookkeeping)
        if self.ctx.streams is None:
            self.publisher.send([])
        if not together:
            _unmark(ctx, job_id)

    def _with_retries(self, spec: ModelSpec) -> Outcome:
        settings = self.ctx.settings
        retrying = Retrying(
            retry=retry_if_exception_type(RetryableBackendError),
            stop=stop_after_attempt(settings.backend_retries + 1),
            wait=wait_exponential_jitter(initial=settings.backend_retry_base_seconds, max=10),
            before_sleep=self._before_retry,
            sleep=self.interrupt.sleep,  # a cancel or a shutdown cuts the back-off short
            reraise=True,
        )
        try:
            return retrying(self._attempt, spec)
        except Interrupted as stop:
            if stop.reason is not Reason.cancelled:
                raise
            # Between two tries: readers were sent a reset if the last try had shown tokens.
            return self._cancelled(None)
        except BackendError as exc:
            # Keep what the readers were shown, so the stream and the stored output agree.
            return self._charged(_failure(exc.type, exc.message))

    def _before_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("backend error, retrying: %s", exc, extra=self._log())
        if isinstance(exc, BackendError):
            metrics.BACKEND_RETRIES.labels(self.claim.model, exc.type).inc()
        # The back-off counts as progress: the lease must outlive it.
        sleep = state.next_action.sleep if state.next_action else 0.0
        self.ctx.leases.beat(self.claim.token, grace=sleep)
        self.parts, self.completion = [], Completion()  # the next try starts over
        if self.emitted:
            self.restarts += 1
            self.publisher.send([Event.of(ResetData(attempt=self.claim.attempt + self.restarts))])
            self.emitted = False

    def _attempt(self, spec: ModelSpec) -> Outcome:
        timeout = self.ctx.settings.backend_timeout_seconds
        stream = open_stream(spec, request_of(self.claim), timeout)
        engine = self.ctx.streams
        if engine is not None and isinstance(stream, ClientStream):
            request = stream.lean_request()
            if request is not None:
                try:
                    return self._relayed(engine, stream, request)
                except sse.NotLean:  # huggingface_hub sends it (a redirect, say)
                    stream = open_stream(spec, request_of(self.claim), timeout)
        if self.publisher.leading:
            self.publisher.send([])
        return self._read(stream)

    def _relayed(
        self, engine: StreamEngine, stream: ClientStream, request: RequestParameters
    ) -> Outcome:
        """The attempt on the process's stream loop (workers/engine.py): this thread waits
        for the stream's end, the loop reads it and writes its tokens."""
        self.parts = []
        self.completion = stream.completion
        self.first_token_at = None
        sink = _Sink(self, metrics.INTER_TOKEN.labels(self.claim.model), stream)
        self._stop_if_interrupted()
        relay = engine.relay(stream, request, self.ctx.settings.backend_timeout_seconds, sink)
        self.interrupt.attach(relay)
        try:
            try:
                cancelled = relay.wait()
                if relay.finished is not None:  # the loop took the job's end (`_Sink.ending`)
                    assert sink.end is not None
                    self.finished_on_loop = relay.finished
                    return sink.end.outcome
                if not cancelled:
                    stream.ended()
            except (ClaimLost, RedisUnavailable, sse.NotLean):
                raise
            except Exception as exc:
                if relay.finished:
                    raise  # the job ended; its closing write failed, as `finish` raises it
                raise stream.failure(exc) from exc
            if cancelled:
                return self._cancelled(self.first_token_at)
        except BackendError:
            if self._cancel_failed_it():
                return self._cancelled(self.first_token_at)
            raise
        finally:
            self.interrupt.attach(None)
            stream.close()
        return self._succeeded(stream, self.first_token_at)

    def _succeeded(self, stream: BackendStream, first_token_at: datetime | None) -> Outcome:
        reason = finish_reason_of(stream.completion.finish_reason or "stop")
        done = Outcome(JobStatus.succeeded, finish_reason=reason, first_token_at=first_token_at)
        return self._charged(done)

    def _read(self, stream: BackendStream) -> Outcome:
        """The attempt in this thread: it reads the stream and writes its tokens."""
        parts = self.parts = []
        self.completion = stream.completion
        first_token_at: datetime | None = None
        pace = ReadPace(metrics.INTER_TOKEN.labels(self.claim.model), self.claim.params.max_tokens)
        self.interrupt.attach(stream)
        try:
            self._stop_if_interrupted()
            reading = time.monotonic()
            for delta in stream:
                now = time.monotonic()
                if first_token_at is None:
                    first_token_at = datetime.now(UTC)
                    self.emitted = True
                parts.append(delta)
                # Read at once, the token was waiting in a buffer, and likely others with it.
                buffered = now - reading < ReadPace.BUFFERED_S
                if self.publisher.add_token(delta, now, more=buffered):
                    return self._cancelled(first_token_at)
                if not self.ctx.leases.beat(self.claim.token, now=now):
                    raise ClaimLost
                if now > self.interrupt.deadline:
                    raise FatalBackendError("deadline_exceeded", RUN_DEADLINE_MESSAGE)
                pause = pace.read(now, len(parts), self.publisher)
                if pause:
                    self.interrupt.sleep(pause)  # a cancel or a shutdown cuts it short
                reading = time.monotonic()
            pace.end(time.monotonic())
        except BackendError:
            if self._cancel_failed_it():
                return self._cancelled(first_token_at)
            raise
        finally:
            self.interrupt.attach(None)
            stream.close()
        return self._succeeded(stream, first_token_at)

    def _cancel_failed_it(self) -> bool:
        """After a backend error: an interrupt aborts the backend's stream, which fails it.
        True when a cancel did (the tokens read are flushed); raises the interrupt when a
        deadline or a shutdown did; False when the backend failed on its own."""
        if self.interrupt.reason is Reason.cancelled:
            self.publisher.flush()
            return True
        self._stop_if_interrupted()
        return False

    def _stop_if_interrupted(self) -> None:
        if self.interrupt.reason is Reason.deadline or time.monotonic() > self.interrupt.deadline:
            raise FatalBackendError("deadline_exceeded", RUN_DEADLINE_MESSAGE)
        if self.interrupt.reason is not None:
            raise Interrupted(self.interrupt.reason)

    def _cancelled(self, first_token_at: datetime | None) -> Outcome:
        # The flush that saw the flag carried every pending token: all of `parts` was published.
        cancelled = Outcome(
            JobStatus.cancelled,
            finish_reason="cancelled",
            output_tokens=0,
            first_token_at=first_token_at,
        )
        return self._charged(cancelled)

    def _charged(self, outcome: Outcome) -> Outcome:
        """`outcome` with the current try's output and what it cost, however it ended: the
        tokens were produced, so they are charged."""
        output = "".join(self.parts)
        completion = self.completion
        output_tokens = completion.output_tokens
        if output_tokens is None:
            output_tokens = len(self.parts)  # one delta per token
        produced = output_tokens or outcome.status is JobStatus.succeeded
        if not produced or self.spec is None:
            return replace(outcome, output=output)  # nothing to charge
        input_tokens = completion.input_tokens
        if input_tokens is None:
            # The backend reports the prompt's count only as its stream ends: a stream cut
            # short (cancelled, failed) is charged an estimate of it instead.
            input_tokens = self.claim.input.estimated_tokens()
        return replace(
            outcome,
            output=output,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=self.spec.cost_usd(input_tokens, output_tokens),
        )

    def finish(self, outcome: Outcome) -> None:
        # Tokens not yet flushed go with the closing events, in one write after the row ends
        # (a cancelled job has none: the flush that saw the flag carried them all). A stream
        # that ended well on the stream loop was ended there, the same way (`_Sink.ending`).
        finished = self.finished_on_loop
        if finished is None:
            finished = self.ctx.direct.finish(self.claim, outcome)
            if finished:
                # In the closing write's round trip, before its events: a client that submits
                # again on `done` finds its key's limits settled (a key without limits
                # reserved nothing: nothing to settle) and, sending the same request again,
                # hits the cache.
                self.publisher.send(
                    outcome.closing_events(), final=True, also=self._bookkeeping(outcome)
                )
        if not finished:
            log.warning("finish refused: job already ended or taken over", extra=self._log())
            return
        record_finish(self.claim, outcome, datetime.now(UTC))
        log.info(
            "job %s %s: %s output tokens",
            self.claim.job_id,
            outcome.status.value,
            outcome.output_tokens,
            extra={
                **self._log(),
                "model": self.claim.model,
                "status": outcome.status.value,
                "finish_reason": outcome.finish_reason,
                "output_tokens": outcome.output_tokens,
                "ms": round((time.monotonic() - self.started) * 1000, 1),
                "error_type": outcome.error_type,
            },
        )

    def _bookkeeping(self, outcome: Outcome) -> Also | None:
        """The job's end in Redis beside its closing events: its limits settled, its answer
        stored in the response cache (best effort: a missed store costs a later request a
        backend call, a missed settle lapses with its window and day)."""
        claim = self.claim
        settle = claim.limited
        key = claim.params.cache_key if outcome.status is JobStatus.succeeded else None
        if not settle and key is None:
            return None
        job_id, ttl = str(claim.job_id), self.ctx.settings.cache_ttl_seconds

        def bookkeeping(pipe: Any) -> None:
            if settle:
                limits.settle_in(
                    pipe, job_id, outcome.input_tokens, outcome.output_tokens, outcome.cost_usd
                )
            if key is not None:
                answer = cache.CachedAnswer(
                    output=outcome.output,
                    finish_reason=outcome.finish_reason,
                    input_tokens=outcome.input_tokens,
                    output_tokens=outcome.output_tokens,
                )
                cache.store_in(pipe, key, answer, ttl)

        return bookkeeping

    def _log(self) -> dict[str, Any]:
        return {"job_id": str(self.claim.job_id), "attempt": self.claim.attempt}


class _Sink:
    """A generation's side of its stream on the loop: the deltas read, from the loop's thread
    (the generation's waits meanwhile)."""

    __slots__ = ("_generation", "_histogram", "_last", "_stream", "end", "max_tokens", "publisher")

    def __init__(self, generation: Generation, histogram: Any, stream: ClientStream) -> None:
        self._generation = generation
        self._histogram = histogram
        self._stream = stream
        self._last = 0.0
        self.publisher: TokenPublisher | None = generation.publisher
        self.max_tokens = generation.claim.params.max_tokens
        self.end: LoopEnd | None = None

    def ending(self) -> LoopEnd | None:
        """The job's end, succeeded, for the loop to record: as the thread would after the
        stream (`Generation._succeeded`, then `finish`)."""
        generation = self._generation
        self._stream.ended()  # a stream that did not finish fails, to be tried again
        outcome = generation._succeeded(self._stream, generation.first_token_at)
        also = generation._bookkeeping(outcome)
        self.end = LoopEnd(generation.claim, outcome, also)
        return self.end

    def took(self, deltas: list[str], now: float) -> None:
        generation = self._generation
        if generation.first_token_at is None:
            generation.first_token_at = datetime.now(UTC)
            generation.emitted = True
        else:  # the inter-token gap, averaged over the tokens of this read
            metrics.observe_times(self._histogram, (now - self._last) / len(deltas), len(deltas))
        self._last = now
        generation.parts += deltas
        generation.publisher.extend(deltas)
        if not generation.ctx.leases.beat(generation.claim.token, now=now):
            raise ClaimLost
        if now > generation.interrupt.deadline:
            raise FatalBackendError("deadline_exceeded", RUN_DEADLINE_MESSAGE)


class ReadPace:
    """When a generation reads its stream's next tokens: at once while a token would be
    published at once, else when the publisher's next flush is due.

    Tokens read before their flush would only wait in the publisher's buffer; meanwhile the
    backend's events wait in the socket's, and are then read together. So a stream's thread
    wakes about once a flush instead of once a token (each wake-up is a system call and a
    turn at the GIL, a third of a worker's CPU at 64 streams). The tokens read together
    after a pause are flushed together, at the first token that the read waits for: the
    first token the backend sends after the flush was due, as without the pause. The pause
    also ends where the stream should end (after `max_tokens`, at the pace seen so far), so
    that its `done` is not held back; a stream that stops early is seen ending at the next
    flush at the latest.

    It also keeps the inter-token histogram: the gap between a stream's tokens, averaged
    over the tokens of each read.
    """

    MIN_PAUSE_S = 0.002
    BUFFERED_S = 0.0003  # a read that returned sooner found its token in a buffer

    def __init__(self, histogram: Any, max_tokens: int) -> None:
        self._histogram = histogram
        self._max_tokens = max_tokens
        self._mark: float | None = None  # when the last read ended
        self._unread = 0  # tokens read since, not yet in the histogram
        self._gap = 0.0  # the latest read's mean gap

    def read(self, now: float, tokens: int, publisher: TokenPublisher) -> float:
        """After a token: seconds to pause before reading the next (0: read on)."""
        if self._mark is None:  # the first token
            self._mark = now
            return 0.0
        self._unread += 1
        if publisher.last_flush >= now:  # this token was flushed: a read ends here
            self._observe(now)
        left = self._max_tokens - tokens
        if not self._gap or left <= 1:
            return 0.0  # no pace known yet, or the end is next: read on
        pause = min(publisher.due_in(now), (left - 1) * self._gap)
        if pause < self.MIN_PAUSE_S:
            return 0.0
        if self._unread:  # a read ends here too
            self._observe(now)
        return pause

    def end(self, now: float) -> None:
        if self._unread:
            self._observe(now)

    def _observe(self, now: float) -> None:
        assert self._mark is not None
        self._gap = (now - self._mark) / self._unread
        metrics.observe_times(self._histogram, self._gap, self._unread)
        self._mark, self._unread = now, 0


def _run_deadline(claim: Claim, settings: Settings) -> float:
    """When (time.monotonic()) the job's whole run must end: job_deadline_seconds after its
    first attempt started, however many attempts it takes."""
    started = claim.started_at or datetime.now(UTC)
    spent = (datetime.now(UTC) - started).total_seconds()
    return time.monotonic() + settings.job_deadline_seconds - max(0.0, spent)
