"""One Redis pub/sub connection per API process, fanned out to every local SSE client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from api import tasks
from api.events.wire import rendered
from inferq.events import Event, channel

log = logging.getLogger("inferq.hub")

# Live events held for one slow reader; past this it catches up from the Redis stream, so a
# stalled client costs bounded memory and no per-send timer.
LIVE_BACKLOG = 1000
# A channel quiet for this long has its readers re-read the stream, in case a message was
# lost (pub/sub drops what is published while the connection is down). One sweep for all
# readers is far cheaper than a timer around every reader's wait.
QUIET_SECONDS = 5.0


class Inbox:
    """One reader's live events: the hub appends, the reader takes everything pending at once.

    Lighter than an asyncio.Queue: one list and at most one waiting future, which matters
    when one message goes to thousands of readers. `None` in a batch means "read the stream
    instead": the reader fell `LIVE_BACKLOG` behind, or its channel went quiet.
    """

    __slots__ = ("_events", "_waiter")

    def __init__(self) -> None:
        self._events: list[Event | None] = []
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, event: Event | None) -> None:
        if len(self._events) >= LIVE_BACKLOG:
            self._events = [None]  # drop the backlog: the stream holds it all
        else:
            self._events.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def nudge(self) -> None:
        """Wake an idle reader to re-read the stream (a quiet channel may have lost one)."""
        if not self._events:
            self.offer(None)

    async def take(self) -> list[Event | None]:
        while not self._events:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        batch, self._events = self._events, []
        return batch


@dataclass
class _Channel:
    inboxes: set[Inbox] = field(default_factory=set)
    sent: int = 0  # SUBSCRIBE commands sent for this channel
    confirmed: int = 0  # subscribe confirmations received
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    fed: bool = False  # a message arrived since the last quiet sweep


class Hub:
    """Subscribes to a job's channel while anyone in this process listens to it."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._pubsub = redis.pubsub()
        self._channels: dict[str, _Channel] = {}
        self._reader: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        # A private channel keeps the connection open while no job is watched.
        await self._pubsub.subscribe(f"inferq:hub:{os.getpid()}:{id(self)}")
        self._reader = asyncio.create_task(self._read(), name="inferq-hub")
        self._sweeper = asyncio.create_task(self._sweep_quiet(), name="inferq-hub-quiet")

    async def close(self) -> None:
        await tasks.cancel(self._sweeper)
        await tasks.cancel(self._reader)
        await self._pubsub.aclose()

    @property
    def listeners(self) -> int:
        return sum(len(c.inboxes) for c in self._channels.values())

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: str) -> AsyncIterator[Inbox]:
        """Yield an inbox of the job's live events, once Redis has confirmed the subscription."""
        name = channel(job_id)
        inbox = Inbox()
        async with self._lock:
            state = self._channels.setdefault(name, _Channel())
            state.inboxes.add(inbox)
            if len(state.inboxes) == 1 and state.sent == state.confirmed:
                state.sent += 1
                state.ready.clear()
                await self._pubsub.subscribe(name)
        try:
            await state.ready.wait()
            yield inbox
        finally:
            await self._leave(name, state, inbox)

    async def _leave(self, name: str, state: _Channel, inbox: Inbox) -> None:
        async with self._lock:
            state.inboxes.discard(inbox)
            # With a SUBSCRIBE still unconfirmed the state stays, so that its late confirmation
            # cannot be taken for a newer subscription's.
            settled = state.sent == state.confirmed
            if not state.inboxes and settled and self._channels.get(name) is state:
                del self._channels[name]
                await self._pubsub.unsubscribe(name)

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=5.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pub/sub read failed; reconnecting")
                await asyncio.sleep(0.5)
                continue
            if message is not None:
                self._dispatch(message)

    async def _sweep_quiet(self) -> None:
        while True:
            await asyncio.sleep(QUIET_SECONDS)
            for state in list(self._channels.values()):
                if not state.fed:
                    for inbox in state.inboxes:
                        inbox.nudge()
                state.fed = False

    def _dispatch(self, message: dict[str, object]) -> None:
        kind = message["type"]
        name = _text(message["channel"])
        state = self._channels.get(name)
        if state is None:
            return
        if kind == "subscribe":
            state.confirmed += 1
            if state.confirmed >= state.sent:
                state.ready.set()
        elif kind == "message":
            state.fed = True
            event = rendered(Event.from_message(_text(message["data"])))
            for inbox in state.inboxes:
                inbox.offer(event)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
