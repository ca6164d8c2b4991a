"""One Redis pub/sub connection per API process, fanned out to every local SSE client.

The connection is the hub's own (`inferq.resp.PushProtocol`, on the lean connection's
setup): hiredis parses each message as it arrives and the hub dispatches it in the same
step, where redis-py's PubSub cost a read call, a health check and a dict a message
(docs/performance.md). The hub decides what the connection is subscribed to: it sends
every SUBSCRIBE and UNSUBSCRIBE itself and follows their confirmations. When a connection
is lost it makes a new one, subscribes every channel that has readers in one command, and
once Redis confirms, tells those readers to re-read their job's stream after the last event
they delivered: messages published in between are gone from pub/sub, not from the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import redis.exceptions

from api import tasks
from api.events.wire import rendered
from inferq.events import Event, channel
from inferq.resp import PushProtocol, RespLink, pack

log = logging.getLogger("inferq.hub")

# Live events held for one slow reader; past this it catches up from the Redis stream, so a
# stalled client costs bounded memory and no per-send timer.
LIVE_BACKLOG = 1000
# A channel quiet for this long has its readers re-read the stream, in case a message was
# lost (pub/sub drops what is published while the connection is down). One sweep for all
# readers is far cheaper than a timer around every reader's wait.
QUIET_SECONDS = 5.0
# A connection silent this long is asked a PING (an answer is due within the lean
# connection's reply timeout), as redis-py's health check asks an idle one.
IDLE_SECONDS = 30.0
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
    connection was replaced and live events may have been lost meanwhile. `lost`, set by
    `take`, tells the last from a quiet channel's wake-up: it is False when the batch's
    `None` came only from the quiet sweep (or a shutdown's wake-up).
    """

    __slots__ = ("_events", "_lost", "_waiter", "lost")

    def __init__(self) -> None:
        self._events: list[Event | None] = []
        self._waiter: asyncio.Future[None] | None = None
        self._lost = False  # a `None` pending that says events may have been lost
        self.lost = False  # the same of the batch `take` returned last

    def offer(self, event: Event | None) -> None:
        if len(self._events) >= LIVE_BACKLOG:
            self._events = [None]  # drop the backlog: the stream holds it all
            self._lost = True
        else:
            self._events.append(event)
            if event is None:
                self._lost = True
        self._wake()

    def nudge(self) -> None:
        """Wake an idle reader to re-read the stream (a quiet channel may have lost one)."""
        if not self._events:
            self._events.append(None)
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Event | None]:
        while not self._events:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        batch, self._events = self._events, []
        self.lost, self._lost = self._lost, False
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
    # A message arrived since the last quiet sweep. A new channel counts as fed: its readers
    # have just read the stream, so the first sweep does not send them to read it again
    # (where the job has not started, a query of its row each).
    fed: bool = True


class Hub:
    """Subscribes to a job's channel while anyone in this process listens to it."""

    def __init__(self, url: str, subscribe_timeout: float = 10.0, name: str | None = None) -> None:
        self._link = RespLink(url, name=name, factory=lambda: PushProtocol(self._on_push))
        self._connection: PushProtocol | None = None
        self._channels: dict[str, _Channel] = {}
        # A private channel keeps the connection subscribed while no job is watched.
        self._private = f"inferq:hub:{os.getpid()}:{id(self)}"
        self._subscribe_timeout = subscribe_timeout
        self._live = False  # the connection is up and subscribed to all that is wanted
        self._reader: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Commands for the connection, written together once the loop's turn is over.
        self._outbox: list[bytes] = []
        # Channels whose last reader left: unsubscribed at the next quiet sweep, together.
        self._idle: set[str] = set()
        self.draining = False

    async def start(self) -> None:
        """Start following Redis; with Redis down the hub keeps trying in the background."""
        self._reader = asyncio.create_task(self._follow(), name="inferq-hub")
        self._sweeper = asyncio.create_task(self._sweep_quiet(), name="inferq-hub-quiet")

    async def close(self) -> None:
        self.drain()
        await tasks.cancel(self._sweeper)
        await tasks.cancel(self._reader)
        self._live = False
        await self._link.close()

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
                # Kept until the next quiet sweep: a reader who comes back meanwhile (a
                # resume, another tab) finds it subscribed, and the sweep unsubscribes
                # every channel left idle in one write instead of one a reader.
                self._idle.add(name)

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
        # Not ready either way: a reader who comes while an UNSUBSCRIBE is under way must
        # wait for the SUBSCRIBE after it, before it reads the stream.
        state.ready.clear()
        self._send("SUBSCRIBE" if wanted else "UNSUBSCRIBE", name)

    def _can_send(self) -> bool:
        connection = self._connection
        return self._live and connection is not None and not connection.closed

    def _send(self, *args: str) -> None:
        """Queue a command; the commands of one turn of the loop (a burst of readers) go in
        one write, in order, which no reader leaving can cut short."""
        outbox = self._outbox
        if not outbox:
            asyncio.get_running_loop().call_soon(self._write, outbox)
        outbox.append(pack(args))

    def _write(self, outbox: list[bytes]) -> None:
        if outbox is not self._outbox:
            return  # queued for a connection since replaced: the new one started over
        self._outbox = []
        if self._can_send():
            assert self._connection is not None
            self._connection.send(b"".join(outbox))

    def _drop_idle(self) -> None:
        """Unsubscribe the channels whose last reader left (and none came back)."""
        idle, self._idle = self._idle, set()
        for name in idle:
            state = self._channels.get(name)
            if state is not None and not state.inboxes:
                self._reconcile(name, state)

    def _on_connect(self, connection: PushProtocol) -> None:
        """A new connection (first or again): subscribe every channel that has readers."""
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
        self._connection = connection
        self._outbox = []  # what was queued for the old connection is superseded
        connection.send(pack(("SUBSCRIBE", *names)))
        # Live from here: readers who come now send their commands after this one.
        self._live = True

    # Reading.

    async def _follow(self) -> None:
        """Keep a subscribed connection: make one, and a new one whenever it is lost."""
        delay = RETRY_FIRST_SECONDS
        failing = False  # attempts failed since the last connection held
        while True:
            try:
                connection = await self._link.connected()
                assert isinstance(connection, PushProtocol)
                self._on_connect(connection)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._live = False
                if not failing:  # the first failure after a loss, not every retry
                    log.warning("pub/sub connection failed (%s); reconnecting", exc)
                failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            failing = False
            since = time.monotonic()
            await connection.lost
            self._live = False
            log.warning("pub/sub connection lost (%s); reconnecting", connection.failure)
            if time.monotonic() - since > RETRY_MAX_SECONDS:
                delay = RETRY_FIRST_SECONDS  # it had held: no back-off carried over
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _sweep_quiet(self) -> None:
        while True:
            await asyncio.sleep(QUIET_SECONDS)
            self._sweep()

    def _sweep(self) -> None:
        """Unsubscribe the idle channels, check the connection, wake the readers of every
        channel that had no message for a whole sweep."""
        self._drop_idle()
        connection = self._connection
        if self._live and connection is not None:
            with contextlib.suppress(redis.exceptions.ConnectionError):
                connection.check(IDLE_SECONDS)
        for state in list(self._channels.values()):
            # A channel waiting for its confirmation re-reads once it comes.
            if not state.fed and state.ready.is_set():
                for inbox in state.inboxes:
                    inbox.nudge()
            state.fed = False

    def _on_push(self, push: Any) -> None:
        """A message or a confirmation, as the connection parsed it."""
        if isinstance(push, redis.exceptions.ResponseError):
            # A command refused (an ACL that denies the channels, say): what the hub counts
            # on no longer holds. A new connection starts over, after the back-off.
            log.error("Redis refused a pub/sub command: %s", push)
            if self._connection is not None:
                self._connection.abort()
            return
        if not isinstance(push, list) or len(push) != 3:
            if not (isinstance(push, list) and push and push[0] == "pong"):
                log.warning("unexpected reply on the pub/sub connection: %r", push)
            return
        kind, name, data = push
        if kind == "message":
            state = self._channels.get(name)
            if state is not None:
                state.fed = True
                try:
                    event: Event | None = rendered(Event.from_message(data))
                except ValueError:
                    # Not an event this process knows (a newer worker's, in a rolling
                    # deploy): its readers read the stream instead, which skips it as well.
                    log.warning("an unreadable message on %s: %.200r", name, data)
                    event = None
                for inbox in state.inboxes:
                    inbox.offer(event)
        elif kind in ("subscribe", "unsubscribe"):
            self._confirmed(name, kind == "subscribe")

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
