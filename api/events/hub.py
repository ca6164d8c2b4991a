"""One Redis pub/sub connection per API process, fanned out to every local SSE client.

The hub, not redis-py, decides what its connection is subscribed to. redis-py's PubSub
reconnects by itself (a failed read disconnects and connects again inside `get_message`)
and would re-send the SUBSCRIBEs it knows of, confirmations and all, without telling
anyone; messages published in between are gone. So the hub sends its own SUBSCRIBE and
UNSUBSCRIBE commands, keeps redis-py's list of channels empty, and hears of every new
connection through a connect callback: it then subscribes every channel that has readers
in one command, and once Redis confirms, tells those readers to re-read their job's stream
after the last event they delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import PubSub

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
# How long one read of the connection waits for a message before looking again.
READ_SECONDS = 5.0
# Pauses between attempts to reach Redis while it is down.
RETRY_FIRST_SECONDS = 0.05
RETRY_MAX_SECONDS = 2.0


class HubUnavailable(redis.exceptions.ConnectionError):
    """The hub could not get a subscription confirmed in time: Redis is unreachable.

    A Redis connection error, so that every route answers it as the outage it is (a 503).
    """


class Inbox:
    """One reader's live events: the hub appends, the reader takes everything pending at once.

    Lighter than an asyncio.Queue: one list and at most one waiting future, which matters
    when one message goes to thousands of readers. `None` in a batch means "read the stream
    instead": the reader fell `LIVE_BACKLOG` behind, its channel went quiet, or the hub's
    connection was replaced and live events may have been lost meanwhile.
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
    """What the hub wants for one channel and what it has asked of the current connection.

    Redis answers every SUBSCRIBE and UNSUBSCRIBE of a channel once, in order, so the last
    command sent says what the connection will be subscribed to once `pending` replies
    have come back.
    """

    inboxes: set[Inbox] = field(default_factory=set)
    subscribed: bool = False  # the last command sent on this connection was a SUBSCRIBE
    pending: int = 0  # commands sent on this connection whose replies have not come yet
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # subscribed and confirmed
    resync: bool = False  # once confirmed, readers must re-read the stream
    fed: bool = False  # a message arrived since the last quiet sweep


class Hub:
    """Subscribes to a job's channel while anyone in this process listens to it."""

    def __init__(self, redis: aioredis.Redis, subscribe_timeout: float = 10.0) -> None:
        self._pubsub = _HubPubSub(self, redis.connection_pool)
        self._channels: dict[str, _Channel] = {}
        # A private channel keeps the connection subscribed while no job is watched.
        self._private = f"inferq:hub:{os.getpid()}:{id(self)}"
        self._subscribe_timeout = subscribe_timeout
        self._live = False  # the connection is up and subscribed to all that is wanted
        self._reader: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self.draining = False

    async def start(self) -> None:
        """Start following Redis; with Redis down the hub keeps trying in the background."""
        self._reader = asyncio.create_task(self._read(), name="inferq-hub")
        self._sweeper = asyncio.create_task(self._sweep_quiet(), name="inferq-hub-quiet")

    async def close(self) -> None:
        self.drain()
        await tasks.cancel(self._sweeper)
        await tasks.cancel(self._reader)
        for send in list(self._sends):
            await tasks.cancel(send)
        connection = self._pubsub.connection
        if connection is not None:
            # The connection goes back to the pool: its next user must not be subscribed.
            connection.deregister_connect_callback(self._on_connect)
        await self._pubsub.aclose()

    def drain(self) -> None:
        """The process is stopping: wake every reader so that its stream can end now.

        Live delivery goes on; a reader decides what to do with the wake-up (an SSE feed
        ends its response cleanly, so that its client resumes on another process).
        """
        self.draining = True
        for state in self._channels.values():
            state.ready.set()  # a reader still waiting for its confirmation goes on, and ends
            for inbox in state.inboxes:
                inbox.nudge()

    @property
    def listeners(self) -> int:
        return sum(len(c.inboxes) for c in self._channels.values())

    @property
    def channels(self) -> int:
        """Channels the hub holds state for (each subscribed, or about to change)."""
        return len(self._channels)

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: str) -> AsyncIterator[Inbox]:
        """Yield an inbox of the job's live events, once Redis has confirmed the subscription.

        Raises HubUnavailable if no confirmation comes within the subscribe timeout (Redis
        is down, or the connection to it is being re-established for that long).
        """
        name = channel(job_id)
        inbox = Inbox()
        state = self._channels.get(name)
        if state is None:
            state = self._channels[name] = _Channel()
        state.inboxes.add(inbox)
        try:
            if not state.ready.is_set():
                self._reconcile(name, state)
                try:
                    async with asyncio.timeout(self._subscribe_timeout):
                        await state.ready.wait()
                except TimeoutError:
                    raise HubUnavailable("the live event connection to Redis is down") from None
            yield inbox
        finally:
            state.inboxes.discard(inbox)
            if not state.inboxes:
                self._reconcile(name, state)

    # Sending. Each change is decided and its command queued in one step, without waiting in
    # between, so that commands reach the connection in the order their bookkeeping assumes.

    def _reconcile(self, name: str, state: _Channel) -> None:
        """Send what brings the connection to what the channel's readers want."""
        wanted = bool(state.inboxes)
        if state.pending == 0 and not wanted and not state.subscribed:
            if self._channels.get(name) is state:
                del self._channels[name]
            return
        if wanted == state.subscribed or not self._can_send():
            return  # done or under way; or the next connection subscribes what is wanted
        state.subscribed = wanted
        state.pending += 1
        if wanted:
            state.ready.clear()
        self._send("SUBSCRIBE" if wanted else "UNSUBSCRIBE", name)

    def _can_send(self) -> bool:
        connection = self._pubsub.connection
        return self._live and connection is not None and connection.is_connected

    def _send(self, *args: str) -> None:
        # A task of its own: a reader that leaves mid-write must not cut the command short,
        # which would break the connection that every reader shares.
        send = asyncio.ensure_future(self._write(*args))
        self._sends.add(send)
        send.add_done_callback(self._sent)

    async def _write(self, *args: str) -> None:
        connection = self._pubsub.connection
        # Checked in the same step as the write starts: never reconnect from here, only the
        # reading task does, so that a new connection is always set up by `_on_connect`.
        if self._live and connection is not None and connection.is_connected:
            await connection.send_command(*args, check_health=False)

    def _sent(self, send: asyncio.Task[None]) -> None:
        self._sends.discard(send)
        if not send.cancelled() and send.exception() is not None:
            # The connection is broken; the reading task notices and starts a new one.
            self._live = False
            log.warning("pub/sub command failed: %s", send.exception())

    async def _on_connect(self, connection: Any) -> None:
        """A new connection (first or again): subscribe every channel that has readers."""
        self._live = False
        names = [self._private]
        for name, state in list(self._channels.items()):
            state.pending = 0
            state.subscribed = bool(state.inboxes)
            if not state.subscribed:
                del self._channels[name]
                continue
            state.pending = 1
            state.resync = True
            state.ready.clear()
            names.append(name)
        # Live from here: the write below is queued first, so readers who come while it is
        # under way send their own commands after it, as they must.
        subscribing = connection.send_command("SUBSCRIBE", *names, check_health=False)
        self._live = True
        try:
            await subscribing
        except BaseException:
            self._live = False
            raise

    def _lost(self) -> None:
        """The connection failed: send nothing until a new one is set up."""
        self._live = False

    # Reading.

    async def _read(self) -> None:
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                await self._connect()
                message = await self._pubsub.get_message(timeout=READ_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                connection = self._pubsub.connection
                if connection is None or not connection.is_connected:
                    self._live = False
                if delay == RETRY_FIRST_SECONDS:
                    log.warning("pub/sub connection lost (%s); reconnecting", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            delay = RETRY_FIRST_SECONDS
            if message is not None:
                self._dispatch(message)

    async def _connect(self) -> None:
        pubsub = self._pubsub
        if pubsub.connection is None:
            await pubsub.connect()
            assert pubsub.connection is not None
            pubsub.connection.register_connect_callback(self._on_connect)
            await self._on_connect(pubsub.connection)  # no callback for the first connect
        elif not self._live:
            # Whatever state the old connection was left in, a new one starts clean.
            await pubsub.connection.disconnect()
            await pubsub.connection.connect()

    async def _sweep_quiet(self) -> None:
        while True:
            await asyncio.sleep(QUIET_SECONDS)
            for state in list(self._channels.values()):
                # A channel waiting for its confirmation re-reads once it comes.
                if not state.fed and state.ready.is_set():
                    for inbox in state.inboxes:
                        inbox.nudge()
                state.fed = False

    def _dispatch(self, message: dict[str, object]) -> None:
        kind = message["type"]
        if kind == "message":
            state = self._channels.get(_text(message["channel"]))
            if state is not None:
                state.fed = True
                event = rendered(Event.from_message(_text(message["data"])))
                for inbox in state.inboxes:
                    inbox.offer(event)
        elif kind in ("subscribe", "unsubscribe"):
            self._confirmed(_text(message["channel"]), kind == "subscribe")

    def _confirmed(self, name: str, subscribed: bool) -> None:
        state = self._channels.get(name)
        if state is None:
            if subscribed and name != self._private:
                # A subscription nobody wants (a command that crossed a reconnect): drop it.
                state = self._channels[name] = _Channel(subscribed=True)
                self._reconcile(name, state)
            return
        if state.pending:
            state.pending -= 1
            if state.pending:
                return
        elif state.subscribed != subscribed:
            # A reply the hub did not count on (a command that crossed a reconnect): what
            # Redis says wins. A lost subscription is taken again, and its readers re-read.
            state.subscribed = subscribed
            if not subscribed:
                state.resync = True
                state.ready.clear()
        if state.subscribed and state.inboxes:
            state.ready.set()
            if state.resync:
                state.resync = False
                for inbox in state.inboxes:
                    inbox.offer(None)
        else:
            self._reconcile(name, state)


class _HubPubSub(PubSub):
    """redis-py's PubSub that tells the hub when a failed command makes it reconnect."""

    def __init__(self, hub: Hub, pool: aioredis.ConnectionPool) -> None:
        super().__init__(pool)
        self._hub = hub

    async def _reconnect(self, conn: Any, *args: Any, **kwargs: Any) -> None:
        self._hub._lost()
        await super()._reconnect(conn, *args, **kwargs)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
