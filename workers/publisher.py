"""The worker's side of the token stream: coalesced flushes through one Lua script."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as redis_errors

from inferq.events import LOST, REFUSED, Event, EventType, fence, script_args, script_keys
from inferq.lifecycle import Claim
from inferq.protocol import ResetData, TokenData

log = logging.getLogger("inferq.worker")

# A Redis that cannot be reached (restarting, failing over, a network cut).
UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError)
# Back-off between tries while Redis is unreachable: quick to notice its return, then calmer.
RETRY_FIRST_S, RETRY_MAX_S = 0.05, 1.0


# Commands of the caller's, added to a write's round trip (TokenPublisher.send).
Also = Callable[[Any], None]


def _both(first: Also | None, second: Also | None) -> Also | None:
    if first is None or second is None:
        return first or second

    def both(pipe: Any) -> None:
        first(pipe)
        second(pipe)

    return both


class ClaimLost(Exception):
    """Another worker took the job over (our lease expired); stop without finishing."""


class StreamLost(Exception):
    """Redis lost the stream since this writer's last write (PUBLISH_SCRIPT answered LOST):
    nothing was written, and the next write shows readers the whole text again first."""


class RedisUnavailable(Exception):
    """Redis stayed unreachable past the publisher's bound. Not a failure of the job: stop the
    attempt without finishing it, so that its lease lapses and it runs again later."""


class FlushPace:
    """How often a stream flushes: every `base_s` while few streams run in this process,
    stretched (up to `max_s`) so that the process writes about `budget` flushes a second.

    Every flush is a Redis round trip for the worker, a message for each API process and a
    write to each reader. With dozens of streams per process those per-flush costs, not the
    tokens, were what saturated the machine (README, performance); under load each flush
    carries more tokens instead. A stream's first token is always sent at once.
    """

    def __init__(self, base_s: float, budget: float, max_s: float) -> None:
        self.base_s, self.budget, self.max_s = base_s, budget, max_s
        self.active = 0
        self._lock = threading.Lock()

    def interval(self) -> float:
        return min(self.max_s, max(self.base_s, self.active / self.budget))

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        with self._lock:
            self.active += 1
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1


@dataclass
class Shown:
    """What readers were shown since the last `reset`: written again, after a `reset`, when
    Redis may have lost the stream, so that the tokens after the last `reset` stay the text."""

    attempt: int
    parts: list[str] = field(default_factory=list)
    tokens: int = 0

    def add(self, text: str, tokens: int) -> None:
        self.parts.append(text)
        self.tokens += tokens

    def extend(self, deltas: list[str]) -> None:
        """Tokens written one delta each (the replay joins them)."""
        self.parts += deltas
        self.tokens += len(deltas)

    def record(self, events: list[Event]) -> None:
        """Follow the caller's own events (a `reset` starts the text over)."""
        for event in events:
            if event.type is EventType.reset:
                self.attempt = event.parse(ResetData).attempt or self.attempt
                self.parts, self.tokens = [], 0
            elif event.type is EventType.token:
                token = event.parse(TokenData)
                self.add(token.text, token.count)

    def replay(self) -> list[Event]:
        events = [Event.of(ResetData(attempt=self.attempt))]
        if self.parts:
            text = "".join(self.parts)
            events.append(Event.of(TokenData(text=text, tokens=self.tokens)))
        return events


class _Outage:
    """A writer's tries while Redis is unreachable: a back-off between them, up to a bound.

    The claim's fence holds on a Redis that came back empty too: the first fenced write
    takes the missing claim key."""

    def __init__(self, bound_s: float, job_id: str, error: Exception) -> None:
        log.warning(
            "Redis unreachable, retrying for up to %.0f s: %s",
            bound_s,
            error,
            extra={"job_id": job_id},
        )
        self._bound_s = bound_s
        self._deadline = time.monotonic() + bound_s
        self._delay = RETRY_FIRST_S

    def wait(self, error: Exception) -> None:
        """Sleep before the next try; RedisUnavailable once the bound has passed."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise RedisUnavailable(f"Redis unreachable for {self._bound_s:.0f} s") from error
        time.sleep(min(self._delay, left))
        self._delay = min(2 * self._delay, RETRY_MAX_S)


class TokenPublisher:
    """Writes a job's events under its claim; each flush also reads the job's cancel flag and
    learns whether the claim still holds (one round trip)."""

    def __init__(
        self,
        script: Any,
        job_id: str,
        *,
        maxlen: int,
        ttl: int,
        pace: FlushPace,
        flush_max_tokens: int,
        claim: Claim,
        outage_s: float = 30.0,
    ) -> None:
        self._script = script
        self._job_id = job_id
        self._keys = script_keys(job_id)
        self._fence = fence(claim.attempt, str(claim.token))
        self._maxlen = maxlen
        self._ttl = ttl
        self._pace = pace
        self._max_tokens = flush_max_tokens
        self._outage_s = outage_s
        self._pending: list[str] = []
        self._lead: list[Event] = []  # for the next write, ahead of its tokens
        self._also: Also | None = None  # commands for the next write (the lead's, the end's)
        self._closing: list[Event] = []  # the job's last events, after its last tokens
        self._write_ttl = 0
        self._shown = Shown(claim.attempt)
        self._wrote = False  # a write under this claim was answered
        # The next write shows readers the whole text again first: the last one failed (it
        # may have gone through all the same), or Redis lost the stream.
        self._replaying = False
        self._last_flush = 0.0
        self.cancelled = False

    def send(self, events: list[Event], *, final: bool = False, also: Also | None = None) -> bool:
        """Write events now (pending tokens first); True when the job was asked to cancel.

        Raises ClaimLost, having written nothing, once a newer claim has written; raises
        RedisUnavailable once Redis stayed unreachable for `outage_s`. `also` adds commands
        of the caller's to the same round trip, best effort: their answers are not read, and
        a write retried after an outage goes without them.
        """
        also = _both(self.take_also(), also)
        outage: _Outage | None = None
        while True:
            batch, deltas = self.take()
            batch += events
            if not batch:
                return self.cancelled
            try:
                flag = self._call(batch, self._ttl if final else 0, also)
            except UNREACHABLE as exc:
                # Redis may come back empty, or the write may have gone through unanswered:
                # the next try shows the whole text again first (`failed`), after a back-off.
                self.failed(deltas)
                outage = outage or _Outage(self._outage_s, self._job_id, exc)
                outage.wait(exc)
                also = None
                continue
            also = None
            try:
                self.wrote(flag, deltas)
            except StreamLost:
                continue  # once: the write again starts the text over, which cannot be LOST
            self._shown.record(events)
            return self.cancelled

    def lead(self, events: list[Event], also: Also | None = None) -> None:
        """Events to go first in the next write (a job's `status`), and commands of the
        caller's for that write's round trip: written by the next `send`, or by the stream
        loop as it opens the stream (workers/engine.py), in the same round trip as other
        streams' writes."""
        self._lead = [*self._lead, *events]
        self._also = _both(self._also, also)

    @property
    def leading(self) -> bool:
        """Whether lead events wait for a write."""
        return bool(self._lead)

    def close_with(self, events: list[Event], also: Also | None = None) -> None:
        """The job's closing events, for the stream loop's last write of it: after the pending
        tokens, with the stream's time to live (as `send(events, final=True, also=also)`)."""
        self._closing = list(events)
        self._also = _both(self._also, also)
        self._write_ttl = self._ttl

    def take(self) -> tuple[list[Event], list[str]]:
        """The next write's events: the whole text again after a `reset` if a write failed
        or the stream was lost, the lead events, then the pending tokens as one event (none
        when none are pending); and the tokens: the buffer is emptied (`failed` puts them
        back if their write fails, and the lead events stay until a write is answered)."""
        deltas, self._pending = self._pending, []
        events = self._shown.replay() if self._replaying else []
        events += self._lead
        if deltas:
            # `tokens`: so that a poll can tell a running job's token count.
            events.append(Event.of(TokenData(text="".join(deltas), tokens=len(deltas))))
        events += self._closing
        return events, deltas

    def take_also(self) -> Also | None:
        """The next write's commands (the lead's, the end's), for the write `take` makes
        (once: a write tried again goes without them)."""
        also, self._also = self._also, None
        return also

    def wrote(self, flag: Any, deltas: list[str]) -> bool:
        """Record a write of `take`'s events that Redis answered with `flag`; True when the job
        was asked to cancel. Raises ClaimLost if the write was refused, and StreamLost, the
        write to be made again, if Redis lost the stream since the last write."""
        if flag == REFUSED:
            raise ClaimLost
        if flag == LOST:
            log.warning(
                "Redis lost the job's stream; writing the whole text again",
                extra={"job_id": self._job_id},
            )
            self.failed(deltas)
            raise StreamLost
        self._wrote, self._replaying = True, False
        if self._lead:
            self._shown.record(self._lead)
            self._lead = []
        self._shown.extend(deltas)
        self._closing = []
        self.cancelled = bool(flag)
        self._last_flush = time.monotonic()
        return self.cancelled

    def failed(self, deltas: list[str]) -> None:
        """A write of `take`'s did not happen, or may have: its tokens go back, ahead of any
        read since, and the next write shows the whole text again first, so that a write
        that went through unanswered is not read twice."""
        self._pending[:0] = deltas
        self._replaying = True

    @property
    def replaying(self) -> bool:
        """Whether the next write starts the text over (so it is due even without tokens)."""
        return self._replaying

    def extend(self, deltas: list[str]) -> None:
        """Buffer deltas; whoever calls this decides when they are written."""
        self._pending += deltas

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def showed_tokens(self) -> bool:
        """Whether readers were shown a token since the stream last (re)started."""
        return bool(self._shown.tokens)

    @property
    def keys(self) -> list[str]:
        return self._keys

    def args(self, events: list[Event]) -> list[str | int]:
        """PUBLISH_SCRIPT's arguments for a write of `events` under this publisher's claim
        (with the stream's time to live once it carries the closing events)."""
        return script_args(events, self._maxlen, self._write_ttl, self._fence, self._continuing)

    @property
    def _continuing(self) -> bool:
        return self._wrote and not self._replaying

    def _call(self, events: list[Event], ttl: int, also: Also | None = None) -> Any:
        args = script_args(events, self._maxlen, ttl, self._fence, self._continuing)
        if also is None:
            return self._script(keys=self._keys, args=args)
        # EVALSHA by hand, as api/admission.py sends its scripts: a Script given a pipeline
        # would ask Redis whether it has the script first, a round trip more every time.
        pipe = self._script.registered_client.pipeline(transaction=False)
        also(pipe)
        pipe.evalsha(self._script.sha, len(self._keys), *self._keys, *args)
        flag = pipe.execute(raise_on_error=False)[-1]
        if isinstance(flag, redis_errors.NoScriptError):  # Redis lost its scripts: load, write
            return self._script(keys=self._keys, args=args)
        if isinstance(flag, Exception):
            raise flag
        return flag

    def add_token(self, text: str, now: float | None = None, more: bool = False) -> bool:
        """Buffer a delta; flush every interval or N tokens. True when cancel was requested.

        `now`: the caller's time.monotonic(), when it has just read it. `more`: the caller
        has more tokens at hand (read together with this one): the flush waits for them."""
        self._pending.append(text)
        if now is None:
            now = time.monotonic()
        # The first token since the stream (re)started goes at once: it is the time to first
        # token; the `status` write just before it must not hold it back for an interval.
        due = not self._shown.tokens or (
            not more and now - self._last_flush >= self._pace.interval()
        )
        if due or len(self._pending) >= self._max_tokens:
            return self.send([])
        return self.cancelled

    def flush(self) -> bool:
        return self.send([])

    @property
    def last_flush(self) -> float:
        """When (time.monotonic()) the last write ended."""
        return self._last_flush

    def due_in(self, now: float) -> float:
        """Seconds from `now` until pending tokens are due to be flushed."""
        return self._last_flush + self._pace.interval() - now
