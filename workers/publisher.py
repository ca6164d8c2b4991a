"""The worker's side of the token stream: coalesced flushes through one Lua script."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from inferq.events import REFUSED, Event, EventType, fence, script_args, script_keys
from inferq.lifecycle import Claim


class ClaimLost(Exception):
    """Another worker took the job over (our lease expired); stop without finishing."""


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
    ) -> None:
        self._script = script
        self._keys = script_keys(job_id)
        self._fence = fence(claim.attempt, str(claim.token))
        self._maxlen = maxlen
        self._ttl = ttl
        self._pace = pace
        self._max_tokens = flush_max_tokens
        self._pending: list[str] = []
        self._last_flush = 0.0
        self.cancelled = False

    def send(self, events: list[Event], *, final: bool = False) -> bool:
        """Write events now (pending tokens first); True when the job was asked to cancel.

        Raises ClaimLost, having written nothing, once a newer claim has written.
        """
        if self._pending:
            events = [self._token_event(), *events]
        if not events:
            return self.cancelled
        ttl = self._ttl if final else 0
        flag = self._script(
            keys=self._keys, args=script_args(events, self._maxlen, ttl, self._fence)
        )
        if flag == REFUSED:
            raise ClaimLost
        self.cancelled = bool(flag)
        self._last_flush = time.monotonic()
        return self.cancelled

    def add_token(self, text: str) -> bool:
        """Buffer a delta; flush every interval or N tokens. True when cancel was requested."""
        self._pending.append(text)
        due = time.monotonic() - self._last_flush >= self._pace.interval()
        if due or len(self._pending) >= self._max_tokens:
            return self.send([])
        return self.cancelled

    def flush(self) -> bool:
        return self.send([])

    def _token_event(self) -> Event:
        text = "".join(self._pending)
        count = len(self._pending)  # so that a poll can tell a running job's token count
        self._pending.clear()
        return Event.make(EventType.token, text=text, tokens=count)
