"""A lean Redis connection for hot paths: packed commands in, replies out.

The worker's stream loop writes many EVALSHAs of the publish script, now and then a few
bookkeeping commands before one, pipelined, their answers read in order; the API reads
each event stream's replay (XRANGE) and hands each batch of jobs to the broker. Through
redis-py's asyncio client each command cost about 30 µs of the loop's CPU and each round
trip about 100 µs more (command stacks, retries, per-reply reads with their timeouts, a
pool to take the connection from); here the commands are packed by hiredis straight to
bytes, written in one call, and hiredis parses the replies as they arrive, about a tenth
of that (docs/performance.md). One connection carries every command of its event loop:
commands from different tasks are pipelined on it, and Redis answers them in the order
they were sent. The API's pub/sub hub follows its channels on one made the same way
(`PushProtocol`), whose replies are pushes: each message handed on as it is parsed.

redis-py still reads the URL (`parse_url`), so every Redis URL the platform takes works here
too: `redis://`, `rediss://` (TLS, with the same `ssl_*` options) and `unix://`, with a
username, password and database.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import hiredis
import redis.commands.core
from redis import exceptions as redis_errors
from redis.asyncio.connection import SSLConnection, parse_url

# hiredis's stubs type its argument as a one-item tuple; it takes any number of items.
pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)

# A command waiting for its reply longer than this fails its connection (as redis-py's
# socket timeout would): the writes are tried again on a new one.
REPLY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0


class Recorder(redis.commands.core.CoreCommands):
    """Takes redis-py's command methods (`zrem`, `incr`, `eval`, `set(ex=…)`…) as a pipeline
    does, and keeps each command's arguments, for a caller's commands in a packed write."""

    _event_dispatcher: Any = None  # redis-py's, for commands this one never runs

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any, **options: Any) -> None:
        self.commands.append(args)


def recorded(commands: Callable[[Any], None]) -> list[bytes]:
    """What `commands(pipe)` adds to a pipeline, packed, one item a command."""
    recorder = Recorder()
    commands(recorder)
    return [pack(args) for args in recorder.commands]


class RespProtocol(asyncio.Protocol):
    """One connection: each `execute` writes packed commands and waits for their replies.

    Replies are plain values: ints, str (UTF-8), lists, None; an error reply is a
    ResponseError (NoScriptError for NOSCRIPT) in its place, not raised. A lost connection
    fails every write still waiting with redis's ConnectionError (TimeoutError past
    REPLY_TIMEOUT_S), which the stream loop handles as the outage it is.
    """

    def __init__(self) -> None:
        self._parser = hiredis.Reader(
            encoding="utf-8", errors="replace", replyError=redis_errors.ResponseError
        )
        self._transport: asyncio.Transport | None = None
        self._waiting: collections.deque[tuple[asyncio.Future[list[Any]], int, float]] = (
            collections.deque()
        )
        self._replies: list[Any] = []
        self._watch: asyncio.TimerHandle | None = None
        self._failure: Exception | None = None
        self.failure: Exception | None = None  # why the connection ended, once it has
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def execute(self, packed: bytes, count: int) -> asyncio.Future[list[Any]]:
        """Write `count` packed commands; a future of their `count` replies, in order."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if self.closed or self._transport is None:
            future.set_exception(redis_errors.ConnectionError("the Redis connection is closed"))
            return future
        self._waiting.append((future, count, time.monotonic()))
        self._transport.write(packed)
        if self._watch is None:
            self._arm()
        return future

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        while True:
            reply = parser.gets()
            if reply is False:
                return
            if isinstance(reply, redis_errors.ResponseError) and str(reply).startswith("NOSCRIPT"):
                reply = redis_errors.NoScriptError(str(reply))
            if not self._waiting:
                if not self._unasked(reply):
                    return
                continue
            self._replies.append(reply)
            future, count, _ = self._waiting[0]
            if len(self._replies) == count:
                self._waiting.popleft()
                replies, self._replies = self._replies, []
                if not future.done():
                    future.set_result(replies)

    def _unasked(self, reply: Any) -> bool:
        """A reply no command waits for: here the stream is out of step, and the connection
        fails (False: read no further)."""
        self._failure = redis_errors.ConnectionError("an unexpected reply from Redis")
        if self._transport is not None:
            self._transport.abort()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        failure = self.failure = self._failure or redis_errors.ConnectionError(
            f"the Redis connection was lost: {exc}" if exc else "Redis closed the connection"
        )
        while self._waiting:
            future, _, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(failure)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._watch = loop.call_later(1.0, self._check)

    def _check(self) -> None:
        """Once a second while replies are awaited: a reply overdue fails the connection."""
        self._watch = None
        if not self._waiting:
            return
        if time.monotonic() - self._waiting[0][2] > REPLY_TIMEOUT_S:
            self._failure = redis_errors.TimeoutError(
                f"no reply from Redis in {REPLY_TIMEOUT_S:.0f} s"
            )
            if self._transport is not None:
                self._transport.abort()
            return
        self._arm()


class PushProtocol(RespProtocol):
    """A subscribed connection (RESP2 pub/sub): once the handshake's replies are in, every
    reply is a push, a message or a (un)subscribe confirmation, handed to `on_push` as
    hiredis parses it (a list: kind, channel, data or count). Commands (SUBSCRIBE,
    UNSUBSCRIBE, PING) are written with `send` and answered by pushes.

    `lost` is done once the connection is gone. A connection that says nothing is asked a
    PING by `check`; one that leaves it unanswered past REPLY_TIMEOUT_S is failed, as
    redis-py's health check and socket timeout fail a silent one.
    """

    def __init__(self, on_push: Callable[[Any], None]) -> None:
        super().__init__()
        self._on_push = on_push
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._heard = time.monotonic()
        self._ping_sent: float | None = None

    def send(self, packed: bytes) -> None:
        if self.closed or self._transport is None:
            raise redis_errors.ConnectionError("the Redis connection is closed")
        self._transport.write(packed)

    def data_received(self, data: bytes) -> None:
        self._heard = time.monotonic()
        self._ping_sent = None
        super().data_received(data)

    def _unasked(self, reply: Any) -> bool:
        self._on_push(reply)
        return not self.closed

    def check(self, idle_s: float) -> None:
        """PING a connection quiet for `idle_s`; fail one whose PING went unanswered."""
        now = time.monotonic()
        if self.closed:
            return
        if self._ping_sent is not None:
            if now - self._ping_sent > REPLY_TIMEOUT_S:
                self._failure = redis_errors.TimeoutError(
                    f"no reply from Redis in {REPLY_TIMEOUT_S:.0f} s"
                )
                self.abort()
        elif now - self._heard > idle_s:
            self._ping_sent = now
            self.send(PING)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)


PING = pack(("PING",))


class RespLink:
    """The loop's connection to Redis, made when first needed and again after it is lost."""

    def __init__(
        self,
        url: str,
        name: str | None = None,
        factory: Callable[[], RespProtocol] = RespProtocol,
    ) -> None:
        self._options: dict[str, Any] = dict(parse_url(url))
        self._name = name
        self._factory = factory  # each connection's protocol
        self._protocol: RespProtocol | None = None
        self._connecting: asyncio.Future[RespProtocol] | None = None

    async def execute(self, packed: bytes, count: int) -> list[Any]:
        """Write `count` packed commands in one write; their replies, in order."""
        return await (await self.connected()).execute(packed, count)

    async def call(self, *args: Any, retry: bool = False) -> Any:
        """One command's reply, as `run` sends it."""
        (reply,) = await self.run([pack(args)], retry=retry)
        return reply

    async def run(self, commands: list[bytes], retry: bool = False) -> list[Any]:
        """Packed commands in one write; their replies, the first error reply raised. With
        `retry`, commands whose connection was found lost are sent once more on a new one
        (for commands that may run twice, as redis-py's clients retry them after a server
        restart: reads, and writes whose repeat is harmless)."""
        packed = b"".join(commands)
        try:
            replies = await self.execute(packed, len(commands))
        except redis_errors.ConnectionError:
            if not retry:
                raise
            replies = await self.execute(packed, len(commands))
        for reply in replies:
            if isinstance(reply, redis_errors.ResponseError):
                raise reply
        return replies

    async def close(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.cancel()  # `_connect` closes what it had opened
            await asyncio.wait([connecting])
            # Ended first: its failure seen (not left to be reported unretrieved), or closed.
            if not connecting.cancelled() and connecting.exception() is None:
                connecting.result().close()
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    async def connected(self) -> RespProtocol:
        """The connection: the current one, else a new one (ConnectionError if none can be
        made)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connection()
        return protocol

    async def _connection(self) -> RespProtocol:
        """The connection, once set up; callers that come meanwhile wait for the same one."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            protocol = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._protocol = protocol
        return protocol

    async def _connect(self) -> RespProtocol:
        options, loop = self._options, asyncio.get_running_loop()
        protocol: RespProtocol | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                if "path" in options:
                    _, protocol = await loop.create_unix_connection(self._factory, options["path"])
                else:
                    context = _tls(options)
                    host = options.get("host", "localhost")
                    _, protocol = await loop.create_connection(
                        self._factory,
                        host,
                        options.get("port", 6379),
                        ssl=context,
                        server_hostname=host if context is not None else None,
                    )
                await self._handshake(protocol)
        except BaseException as exc:
            if protocol is not None:  # made, but not set up: nobody else will close it
                protocol.abort()
            if isinstance(exc, OSError | TimeoutError):
                raise redis_errors.ConnectionError(f"cannot connect to Redis: {exc}") from exc
            raise
        return protocol

    async def _handshake(self, protocol: RespProtocol) -> None:
        """AUTH, SELECT and CLIENT SETNAME, as the URL and the name ask."""
        options = self._options
        commands: list[tuple[Any, ...]] = []
        if options.get("password"):
            username = options.get("username")
            auth = (username, options["password"]) if username else (options["password"],)
            commands.append(("AUTH", *auth))
        if int(options.get("db") or 0):
            commands.append(("SELECT", int(options["db"])))
        if self._name:
            commands.append(("CLIENT", "SETNAME", self._name))
        if not commands:
            return
        replies = await protocol.execute(b"".join(pack(c) for c in commands), len(commands))
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, redis_errors.ResponseError):
                protocol.close()
                kind = redis_errors.AuthenticationError if command[0] == "AUTH" else None
                raise (kind or redis_errors.ConnectionError)(f"{command[0]}: {reply}")


def _tls(options: dict[str, Any]) -> ssl.SSLContext | None:
    """The TLS context of a `rediss://` URL, from its `ssl_*` options as redis-py reads them."""
    connection_class = options.get("connection_class")
    if connection_class is None or not issubclass(connection_class, SSLConnection):
        return None
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    required = str(options.get("ssl_cert_reqs", "required")).lower()
    if required in ("none", str(ssl.CERT_NONE)):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif required in ("optional", str(ssl.CERT_OPTIONAL)):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_OPTIONAL
    elif str(options.get("ssl_check_hostname", "true")).lower() in ("false", "0", "no"):
        context.check_hostname = False
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    return context
