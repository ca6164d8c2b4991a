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


@dataclass
class _Channel:
    queues: set[asyncio.Queue[Event | None]] = field(default_factory=set)
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
        return sum(len(c.queues) for c in self._channels.values())

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: str) -> AsyncIterator[asyncio.Queue[Event | None]]:
        """Yield a queue of the job's live events, once Redis has confirmed the subscription."""
        name = channel(job_id)
        queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=LIVE_BACKLOG)
        async with self._lock:
            state = self._channels.setdefault(name, _Channel())
            state.queues.add(queue)
            if len(state.queues) == 1 and state.sent == state.confirmed:
                state.sent += 1
                state.ready.clear()
                await self._pubsub.subscribe(name)
        try:
            await state.ready.wait()
            yield queue
        finally:
            await self._leave(name, state, queue)

    async def _leave(self, name: str, state: _Channel, queue: asyncio.Queue[Event | None]) -> None:
        async with self._lock:
            state.queues.discard(queue)
            # With a SUBSCRIBE still unconfirmed the state stays, so that its late confirmation
            # cannot be taken for a newer subscription's.
            settled = state.sent == state.confirmed
            if not state.queues and settled and self._channels.get(name) is state:
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
                    for queue in state.queues:
                        if queue.empty():
                            queue.put_nowait(None)
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
            for queue in state.queues:
                _offer(queue, event)


def _offer(queue: asyncio.Queue[Event | None], event: Event) -> None:
    """Queue a live event; a reader too far behind gets None: "read the stream instead"."""
    try:
        queue.put_nowait(event)
    except asyncio.QueueFull:
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
