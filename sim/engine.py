"""Continuous batching: one loop, one timer, one token per running sequence per step.

A sequence first waits out its prefill (time to first token), which yields its first
token, then joins the running batch. Every decode step emits one token to each running
sequence and lasts `itl_ms * (1 + batch_slowdown * (running - 1))`. Steps are scheduled
on absolute monotonic deadlines, so timer jitter does not accumulate.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum

from sim.config import SimConfig
from sim.errors import DropConnection, generation_failed, overloaded
from sim.model import Plan, Token
from sim.schemas import FaultMode

# A timer may fire this much before its time (libuv counts in milliseconds).
TIMER_SLACK_S = 0.001


@dataclass(frozen=True, slots=True)
class Job:
    """What to generate, how long prefill takes, and an optional mid-stream fault."""

    plan: Plan
    input_length: int
    prefill_s: float
    fault: FaultMode | None = None
    fault_at: int = 0
    keepalive_s: float | None = None


@dataclass(slots=True)
class Stats:
    """Request counters for /metrics and /sim/state."""

    total_requests: int = 0
    completed: int = 0
    cancelled: int = 0
    generated_tokens: int = 0
    tokenize_requests: int = 0
    last_prompt: str = ""  # the input of the last admitted generation, as the model saw it
    last_input_length: int = 0
    failures: Counter[str] = field(default_factory=Counter)


class _State(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


class _Fault:
    """Queue marker: the sequence fails here."""


class Sequence:
    """One admitted generation; the engine fills it and the route drains it.

    Tokens wait in a deque; a consumer that finds it empty waits on one future, which the
    next token (or the keep-alive timer) resolves. The keep-alive timer is armed once and
    moved on only when it fires early, so a token costs no timer of its own.
    """

    def __init__(self, seq_id: int, job: Job) -> None:
        self.id = seq_id
        self.job = job
        self.state = _State.QUEUED
        self.released = False
        self.failed = False
        self._emitted = 0
        self._delivered = 0
        self._items: deque[Token | _Fault] = deque()
        self._waiter: asyncio.Future[bool] | None = None  # True: the keep-alive is due
        self._keepalive_at = 0.0  # loop time the waiting consumer gets a keep-alive at
        self._timer: asyncio.TimerHandle | None = None

    @property
    def delivered(self) -> int:
        """Tokens handed to the consumer so far."""
        return self._delivered

    @property
    def complete(self) -> bool:
        """Whether the consumer has received the last token."""
        return self._delivered == len(self.job.plan.tokens)

    def advance(self) -> None:
        """Emit the next token, or the fault if this is where it strikes."""
        job = self.job
        if job.fault is not None and self._emitted == job.fault_at:
            self._put(_Fault())
            self.failed = True
            self.state = _State.DONE
            return
        self._put(job.plan.tokens[self._emitted])
        self._emitted += 1
        if self._emitted == len(job.plan.tokens):
            self.state = _State.DONE

    def close(self) -> None:
        """Drop the keep-alive timer: nothing will wait on this sequence again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __aiter__(self) -> Sequence:
        return self

    async def __anext__(self) -> Token | None:
        """The next token; None if none came within the keep-alive interval."""
        if self.complete:
            raise StopAsyncIteration
        if not self._items and await self._wait():
            return None
        item = self._items.popleft()
        if isinstance(item, _Fault):
            raise self._fault_exception()
        self._delivered += 1
        return item

    def _put(self, item: Token | _Fault) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    async def _wait(self) -> bool:
        """Wait for the next item; True if the keep-alive interval passed first."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        keepalive_s = self.job.keepalive_s
        if keepalive_s is not None:
            self._keepalive_at = loop.time() + keepalive_s
            if self._timer is None:
                self._timer = loop.call_at(self._keepalive_at, self._keepalive_due)
        try:
            return await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None

    def _keepalive_due(self) -> None:
        """The timer fired: a keep-alive if the waiting consumer's is due, else wait on."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        loop = asyncio.get_running_loop()
        if loop.time() + TIMER_SLACK_S >= self._keepalive_at:
            self._waiter = None
            waiter.set_result(True)
        else:
            self._timer = loop.call_at(self._keepalive_at, self._keepalive_due)

    def _fault_exception(self) -> Exception:
        if self.job.fault is FaultMode.DISCONNECT:
            return DropConnection()
        return generation_failed("simulated failure")


class Engine:
    """Admission control plus the batching loop; all state of one simulated server."""

    def __init__(self, config: SimConfig) -> None:
        self._config = config
        self._queued: list[tuple[float, int, Sequence]] = []
        self._running: dict[int, Sequence] = {}
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._next_step = 0.0
        self.active = 0
        self.queue_size = 0
        self.stats = Stats()

    @property
    def batch_size(self) -> int:
        """Sequences currently decoding."""
        return len(self._running)

    def submit(self, job: Job) -> Sequence:
        """Admit a generation or raise overloaded, as TGI's `try_acquire` does."""
        if self.active >= self._config.max_concurrent_requests:
            self.stats.failures["overloaded"] += 1
            raise overloaded()
        self._ensure_loop()
        seq = Sequence(next(self._ids), job)
        ready_at = asyncio.get_running_loop().time() + job.prefill_s
        heapq.heappush(self._queued, (ready_at, seq.id, seq))
        self.active += 1
        self.queue_size += 1
        self._wake.set()
        return seq

    def release(self, seq: Sequence) -> None:
        """Free the slot; a sequence released before it finished counts as cancelled."""
        if seq.released:
            return
        seq.released = True
        seq.close()
        self.active -= 1
        if seq.state is _State.QUEUED:
            self.queue_size -= 1
        if seq.state is not _State.DONE:
            self.stats.cancelled += 1
        self._running.pop(seq.id, None)
        seq.state = _State.DONE

    async def stop(self) -> None:
        """Stop the batching loop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            self._join_ready(now)
            if self._running and now >= self._next_step:
                self._step(now)
            await self._sleep_until(self._next_deadline())

    def _join_ready(self, now: float) -> None:
        """Finish due prefills: each yields its first token and joins the batch."""
        while self._queued and self._queued[0][0] <= now:
            _, _, seq = heapq.heappop(self._queued)
            if seq.released:
                continue
            self.queue_size -= 1
            if not self._running:
                self._next_step = now + self._itl(1)
            seq.state = _State.RUNNING
            self._emit(seq)

    def _step(self, now: float) -> None:
        """One decode step: a token for every running sequence."""
        for seq in list(self._running.values()):
            self._emit(seq)
        step_s = self._itl(len(self._running))
        self._next_step = max(self._next_step + step_s, now)

    def _emit(self, seq: Sequence) -> None:
        seq.advance()
        if seq.state is _State.RUNNING:
            self._running[seq.id] = seq
            return
        self._running.pop(seq.id, None)
        if seq.failed:
            err = "dropped" if seq.job.fault is FaultMode.DISCONNECT else "generation"
            self.stats.failures[err] += 1
        else:
            self.stats.completed += 1
            self.stats.generated_tokens += len(seq.job.plan.tokens)

    def _itl(self, running: int) -> float:
        config = self._config
        return config.itl_ms * (1 + config.batch_slowdown * max(running - 1, 0)) / 1000

    def _next_deadline(self) -> float | None:
        deadlines = []
        if self._queued:
            deadlines.append(self._queued[0][0])
        if self._running:
            deadlines.append(self._next_step)
        return min(deadlines, default=None)

    async def _sleep_until(self, deadline: float | None) -> None:
        """Sleep until `deadline`, or until a new sequence arrives."""
        self._wake.clear()
        if deadline is None:
            await self._wake.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._wake.wait()
