"""The worker's side of the token stream: coalesced flushes through one Lua script."""

from __future__ import annotations

import time
from typing import Any

from inferq.events import Event, EventType, script_args, script_keys


class TokenPublisher:
    """Writes a job's events; each flush also reads the job's cancel flag (one round trip)."""

    def __init__(
        self,
        script: Any,
        job_id: str,
        *,
        maxlen: int,
        ttl: int,
        flush_interval_s: float,
        flush_max_tokens: int,
    ) -> None:
        self._script = script
        self._keys = script_keys(job_id)
        self._maxlen = maxlen
        self._ttl = ttl
        self._interval = flush_interval_s
        self._max_tokens = flush_max_tokens
        self._pending: list[str] = []
        self._last_flush = 0.0
        self.cancelled = False

    def send(self, events: list[Event], *, final: bool = False) -> bool:
        """Write events now (pending tokens first); True when the job was asked to cancel."""
        if self._pending:
            events = [self._token_event(), *events]
        if not events:
            return self.cancelled
        flag = self._script(
            keys=self._keys, args=script_args(events, self._maxlen, self._ttl if final else 0)
        )
        self.cancelled = bool(flag)
        self._last_flush = time.monotonic()
        return self.cancelled

    def add_token(self, text: str) -> bool:
        """Buffer a delta; flush every interval or N tokens. True when cancel was requested."""
        self._pending.append(text)
        due = time.monotonic() - self._last_flush >= self._interval
        if due or len(self._pending) >= self._max_tokens:
            return self.send([])
        return self.cancelled

    def flush(self) -> bool:
        return self.send([])

    def _token_event(self) -> Event:
        text = "".join(self._pending)
        self._pending.clear()
        return Event.make(EventType.token, text=text)
