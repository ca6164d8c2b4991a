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
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from sim.config import SimConfig
from sim.errors import DropConnection, generation_failed, overloaded
from sim.model import Plan, Token
from sim.schemas import FaultMode


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
    """One admitted generation; the engine fills its queue and the route drains it."""

    def __init__(self, seq_id: int, job: Job) -> None:
        self.id = seq_id
        self.job = job
        self.state = _State.QUEUED
        self.released = False
        self.failed = False
        self._emitted = 0
        self._delivered = 0
        self._queue: asyncio.Queue[Token | _Fault] = asyncio.Queue()

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
            self._queue.put_nowait(_Fault())
            self.failed = True
            self.state = _State.DONE
            return
        self._queue.put_nowait(job.plan.tokens[self._emitted])
        self._emitted += 1
        if self._emitted == len(job.plan.tokens):
            self.state = _State.DONE

    def __aiter__(self) -> Sequence:
        return self

    async def __anext__(self) -> Token | None:
        """The next token; None if none came within the keep-alive interval."""
        if self.complete:
            raise StopAsyncIteration
        item = await self._get()
        if item is None:
            return None
        if isinstance(item, _Fault):
            raise self._fault_exception()
        self._delivered += 1
        return item

    async def _get(self) -> Token | _Fault | None:
        if self.job.keepalive_s is None:
            return await self._queue.get()
        try:
            async with asyncio.timeout(self.job.keepalive_s):
                return await self._queue.get()
        except TimeoutError:
            return None

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
