"""The token path of a worker process: one asyncio loop reads every backend stream it runs
and writes their tokens to Redis, in one pipeline for all the streams due at once.

A generation's thread (Celery's) claims its job and hands the stream to the loop, with the
job's start (its `status` event and bookkeeping) to write first: the loop writes it as the
stream connects, in the same pipeline as other streams' writes. The thread wakes again when
the stream has ended, to finish the job. In between, nothing
of the job runs in a thread of its own: where a thread a stream woke up for every read and
waited on its own Redis round trip for every flush, the loop reads the streams whose data
came (each read a callback) and writes the flushes of every stream due in one round trip.

Reads are paced to the flushes (as `workers.generate.ReadPace` paces a thread's): a stream
that has shown its first token stops reading until the process's next flush, when all the
streams read what came meanwhile, in one read each, and their tokens go out together. A
stream's first token goes at once (it is the time to first token), and a stream stops
pausing when its end is near, so that its last tokens are not held back.

The request and its answer follow what `workers.backends.sse.LeanConnection` does (the HTTP
framing undone by httptools, llhttp's binding), and fail with the same exceptions, which the
stream maps as it maps its own (tests/test_lean_reader.py reads the same streams through
both). Anything the lean reader
leaves to huggingface_hub is left to the generation's thread (`NotLean`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import httptools
import httpx2
import uvloop
from huggingface_hub.errors import InferenceTimeoutError
from huggingface_hub.inference._common import RequestParameters
from redis import exceptions as redis_errors

from inferq.events import PUBLISH_SCRIPT, PUBLISH_SHA
from inferq.lifecycle import Claim, LoopFinish, Outcome
from inferq.resp import RespLink, pack, recorded
from workers.backends import sse
from workers.backends.base import NUL, REPLACEMENT
from workers.publisher import (
    RETRY_FIRST_S,
    RETRY_MAX_S,
    UNREACHABLE,
    Also,
    ClaimLost,
    FlushPace,
    RedisUnavailable,
    StreamLost,
    TokenPublisher,
)

log = logging.getLogger("inferq.worker")

# After the flush tick resumes the paused streams, how long their reads get before the write.
READ_GRACE_S = 0.002
# The shortest pause worth a pause: a stream due to end sooner reads on.
MIN_PAUSE_S = 0.002
INCOMPLETE = (
    "peer closed connection without sending complete message body (incomplete chunked read)"
)


# A stream's write: the stream, its script arguments, its tokens, its commands (`also`).
Write = tuple["_Reader", list[Any], list[str], Also | None]


class Stream(Protocol):
    """What the loop needs of a backend stream (workers.backends.tgi.ClientStream)."""

    def parse(self, line: str) -> Any: ...

    def take(self, chunk: Any) -> list[str]: ...


class Sink(Protocol):
    """Where a stream's deltas go: the generation, on the loop's thread."""

    @property
    def publisher(self) -> TokenPublisher | None:
        """None: the deltas are only collected (no flushes)."""

    @property
    def max_tokens(self) -> int: ...

    def took(self, deltas: list[str], now: float) -> None:
        """Deltas just read; raising ends the stream with that failure."""

    def ending(self) -> LoopEnd | None:
        """On the loop, once the stream ended well (not cancelled): the job's end for the
        loop to record and write, or None to leave it to the generation's thread. Raising
        fails the stream (one that did not finish, say)."""


@dataclass(frozen=True)
class LoopEnd:
    """A job's end as the loop records it (`Sink.ending`): its row's finish under its claim,
    then the outcome's closing events after its last tokens, with `also`'s commands."""

    claim: Claim
    outcome: Outcome
    also: Also | None


class Relay:
    """One stream on the loop, as its generation's thread holds it."""

    def __init__(self, engine: StreamEngine, reader: _Reader) -> None:
        self._engine = engine
        self._reader = reader
        self.future: concurrent.futures.Future[bool] = concurrent.futures.Future()
        # Set by the loop before `wait` returns: whether the loop finished the job (True),
        # found it ended or taken over (False), or left its end to the thread (None).
        self.finished: bool | None = None

    def abort(self) -> None:
        """Fail the stream at once and close its connection (which frees the backend's slot),
        from any thread: a cancel, a deadline, a shutdown."""
        self._engine.call(self._reader.abort)

    def wait(self) -> bool:
        """Block until the stream has ended (and, for one that ended well, until the loop has
        ended the job or left it to the thread: `finished`): True when a flush found the job
        asked to cancel (the connection is closed); raises the stream's failure as the lean
        reader raises it, or ClaimLost, RedisUnavailable, or what the sink raised."""
        return self.future.result()


class StreamEngine:
    """The worker process's loop, in a thread of its own, and its Redis client for flushes."""

    def __init__(
        self,
        redis_url: str | None,
        pace: FlushPace,
        *,
        flush_max_tokens: int = 16,
        outage_s: float = 30.0,
        finishes: LoopFinish | None = None,
    ) -> None:
        self._redis_url = redis_url
        self.finishes = finishes  # jobs ended on the loop (else by their threads)
        self.pace = pace
        self.flush_max_tokens = flush_max_tokens
        self.outage_s = outage_s
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="inferq-streams", daemon=True)
        self._redis: RespLink | None = None
        self._readers: set[_Reader] = set()
        self._paused: list[_Reader] = []
        self._soon: list[_Reader] = []
        self._soon_scheduled = False
        self._tick: asyncio.TimerHandle | None = None
        self.next_tick = 0.0  # when (time.monotonic()) the next flush tick comes
        self.tick_flushing = False  # between a tick and its flush (READ_GRACE_S)
        self._retry_at = 0.0  # after a failed write: no write before this (time.monotonic())
        self._delay = RETRY_FIRST_S

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            closings = [
                asyncio.run_coroutine_threadsafe(closing.close(), self.loop)
                for closing in (self.finishes, self._redis)
                if closing is not None
            ]
            for closing in closings:
                with contextlib.suppress(Exception):
                    closing.result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        if self._redis_url is not None:
            self._redis = RespLink(self._redis_url, name="inferq-worker-streams")
        self.loop.run_forever()

    def call(self, callback: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(callback)

    def relay(
        self, stream: Stream, request: RequestParameters, timeout: float | None, sink: Sink
    ) -> Relay:
        """Send `request` and read its answer on the loop (from any thread)."""
        reader = _Reader(self, stream, request, timeout, sink)
        relay = Relay(self, reader)
        reader.relay = relay
        self.call(reader.begin)
        return relay

    # Flushes ----------------------------------------------------------------------------------

    def joined(self, reader: _Reader) -> None:
        self._readers.add(reader)
        if self._tick is None and reader.sink.publisher is not None:
            self._schedule_tick()

    def left(self, reader: _Reader) -> None:
        self._readers.discard(reader)

    def _schedule_tick(self) -> None:
        interval = self.pace.interval()
        self.next_tick = time.monotonic() + interval
        self._tick = self.loop.call_later(interval, self._on_tick)

    def _on_tick(self) -> None:
        """Every stream paused for this tick reads again; shortly after, all due flushes go."""
        self._tick = None
        paused, self._paused = self._paused, []
        for reader in paused:
            reader.resume()
        self.tick_flushing = True
        self.loop.call_later(READ_GRACE_S, self._flush_all)
        if self._readers:
            self._schedule_tick()

    def _flush_all(self) -> None:
        self.tick_flushing = False
        self._write([r for r in self._readers if r.flush_due()])

    def flush_soon(self, reader: _Reader) -> None:
        """Write the stream's tokens in the next write (a first token, a full buffer)."""
        self._soon.append(reader)
        if not self._soon_scheduled:
            self._soon_scheduled = True
            self.loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._soon_scheduled = False
        soon, self._soon = self._soon, []
        self._write([r for r in dict.fromkeys(soon) if r.flush_due()])

    def pause(self, reader: _Reader) -> None:
        self._paused.append(reader)

    def _write(self, readers: list[_Reader]) -> None:
        if not readers:
            return
        if time.monotonic() < self._retry_at:  # Redis failed lately: wait for the back-off
            for reader in readers:
                reader.outage_check()
            return
        batch = [(reader, *reader.batch()) for reader in readers]
        self.loop.create_task(self._send(batch))

    async def _send(self, batch: list[Write]) -> None:
        """One pipeline: each stream's write under its own claim (PUBLISH_SCRIPT)."""
        try:
            flags = await self._pipeline(batch)
        except UNREACHABLE as exc:
            delay = self._delay
            self._retry_at = time.monotonic() + delay
            self._delay = min(2 * delay, RETRY_MAX_S)
            log.warning("Redis unreachable, the streams' tokens wait: %s", exc)
            for reader, _, deltas, _ in batch:
                reader.write_failed(deltas, exc)
            self.loop.call_later(delay, self._flush_all)
            return
        except Exception as exc:
            for reader, _, deltas, _ in batch:
                reader.write_failed(deltas, exc, fatal=True)
            return
        self._delay = RETRY_FIRST_S
        for (reader, _, deltas, _), flag in zip(batch, flags, strict=True):
            reader.written(flag, deltas)

    async def _pipeline(self, batch: list[Write], with_also: bool = True) -> list[Any]:
        """Each stream's write answered by its flag; a write's `also` commands go before it,
        their answers unread (best effort, as `TokenPublisher.send` sends them)."""
        assert self._redis is not None
        commands: list[bytes] = []
        writes: list[int] = []  # where each stream's write is among the commands
        for reader, args, _, also in batch:
            if also is not None and with_also:
                commands += recorded(also)
            keys = reader.publisher_keys()
            writes.append(len(commands))
            commands.append(pack(("EVALSHA", PUBLISH_SHA, len(keys), *keys, *args)))
        answers = await self._redis.execute(b"".join(commands), len(commands))
        flags = [answers[i] for i in writes]
        if any(isinstance(flag, redis_errors.NoScriptError) for flag in flags):
            # Redis lost its scripts (restarted, or flushed them): load it, write again.
            await self._redis.execute(pack(("SCRIPT", "LOAD", PUBLISH_SCRIPT)), 1)
            return await self._pipeline(batch, with_also=False)
        return flags


class _Reader(asyncio.Protocol):
    """One backend stream on the loop: its request, its answer, its tokens' way out."""

    def __init__(
        self,
        engine: StreamEngine,
        stream: Stream,
        request: RequestParameters,
        timeout: float | None,
        sink: Sink,
    ) -> None:
        self.engine = engine
        self.stream = stream
        self.request = request
        self.timeout = timeout
        self.sink = sink
        self.publisher = sink.publisher
        self.relay: Relay | None = None
        self._loop = engine.loop
        self._http = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._status = 0  # the answer's, once its head is read
        self._headers: list[tuple[bytes, bytes]] = []
        self._framed = False  # by chunks or by a length (else: up to the close)
        self._body: list[bytes] = []  # the pieces parsed out of the latest read
        self._complete = False  # the whole answer was read
        self._refusal: list[bytes] | None = None  # the body of a refusal, as it comes
        self._lines = sse.LineSplitter("utf-8")
        self._data = sse.DataLines()
        self._last_io = 0.0
        self._received = False  # any byte of the answer
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._wake: asyncio.TimerHandle | None = None  # a pause's end before the tick
        self._aborted = False
        self._writing = False
        self._ended: tuple[bool, BaseException | None] | None = None
        self._settled = False
        self._asked_end = False  # the sink was asked for the job's end (`Sink.ending`)
        self._in_db = False  # the job's finish is on its way to Postgres
        self._closing_due = False  # the job's closing write is still to be made
        self._outage_since: float | None = None
        self._first_at = 0.0  # when the first token was read
        self._tokens = 0

    # The request ------------------------------------------------------------------------------

    def begin(self) -> None:
        self.engine.joined(self)
        if self.publisher is not None and self.publisher.leading:
            self.engine.flush_soon(self)  # the job's `status`, while the stream connects
        self._loop.create_task(self._connect())

    async def _connect(self) -> None:
        parts = urlsplit(self.request.url)
        host, port = parts.hostname or "", parts.port or 80
        try:
            connecting = self._loop.create_connection(lambda: self, host, port)
            await asyncio.wait_for(connecting, self.timeout)
        except TimeoutError as exc:
            self._end(InferenceTimeoutError(f"Inference call timed out: {self.request.url}"), exc)
        except OSError as exc:
            self._end(httpx2.ConnectError(str(exc)), exc)
        except Exception as exc:
            self._end(exc)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = self._transport = cast(asyncio.Transport, transport)  # uvloop's TCP one
        if self._aborted or self._ended is not None:
            transport.abort()
            return
        self._last_io = time.monotonic()
        if self.timeout is not None:
            self._timer = self._loop.call_later(self.timeout, self._idle)
        transport.write(self._request_bytes())

    def _request_bytes(self) -> bytes:
        """The request as http.client sends it for the lean connection."""
        parts = urlsplit(self.request.url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = sse.json_body(self.request)
        host = parts.hostname or ""
        if parts.port is not None and parts.port != 80:
            host = f"{host}:{parts.port}"
        headers = [("Host", host), ("Accept-Encoding", "identity")]
        headers += [
            (name, value)
            for name, value in self.request.headers.items()
            if name.lower() not in ("accept-encoding", "host", "content-length")
        ]
        headers.append(("Content-Length", str(len(body))))
        head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        return (head + "\r\n").encode("latin-1") + body

    def _idle(self) -> None:
        """The timeout, as the lean connection's socket applies it: to each read."""
        self._timer = None
        if self._ended is not None:
            return
        assert self.timeout is not None
        idle = time.monotonic() - self._last_io
        if self._paused or idle < self.timeout:  # a pause of ours is no silence of theirs
            self._timer = self._loop.call_later(self.timeout - idle, self._idle)
            return
        if not self._status:
            self._end(InferenceTimeoutError(f"Inference call timed out: {self.request.url}"))
        else:
            self._end(httpx2.ReadTimeout("timed out"))

    # The answer -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._ended is not None:
            return
        now = self._last_io = time.monotonic()
        self._received = True
        had_head = bool(self._status)
        try:
            self._http.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(self._framing_error(exc), exc)
            return
        if self._status and not had_head:
            self._answer()
        if self._body:
            pieces, self._body = self._body, []
            if self._refusal is not None:
                self._refusal += pieces
            else:
                # The read's events at once: one pace for all the tokens it brought, counted
                # in full (a stream paced on its read's first event would pause though its
                # end is due before the tick, and its `done` would wait for the tick).
                block = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                self._lines_in(self._lines.feed(block), now)
                if self._ended is not None:
                    return
        if self._complete:
            self._whole()

    # httptools' callbacks, during feed_data: they only note what was parsed.

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._status = self._http.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete = True

    def _framing_error(self, exc: Exception) -> Exception:
        if not self._status:
            return httpx2.RemoteProtocolError(str(exc))
        return httpx2.RemoteProtocolError(INCOMPLETE)

    def eof_received(self) -> bool | None:
        self._closed()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ended is not None:
            return
        if self._aborted:
            self._end(httpx2.ReadError("the stream was aborted"))
        elif exc is not None:
            self._end(httpx2.ReadError(str(exc)), exc)
        else:
            self._closed()

    def _closed(self) -> None:
        """The backend closed the connection: the end of an answer framed by the close, else a
        cut."""
        if self._ended is not None:
            return
        if not self._received:
            self._end(httpx2.RemoteProtocolError("Server disconnected without sending a response."))
        elif not self._status:
            self._end(httpx2.RemoteProtocolError("the answer's head was cut"))
        elif self._framed:
            self._end(httpx2.RemoteProtocolError(INCOMPLETE))
        else:
            self._whole()

    def _whole(self) -> None:
        """The whole answer was read."""
        if self._refusal is not None:
            self._refused()
        else:
            self._lines_in(self._lines.end(), time.monotonic())
            self._end(None)

    def _answer(self) -> None:
        headers = dict(self._headers)
        self._framed = (
            b"content-length" in headers
            or b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        )
        status = self._status
        if status == 200:
            content_type = headers.get(b"content-type")
            named = None if content_type is None else content_type.decode("latin-1")
            self._lines = sse.LineSplitter(sse.charset_of(named))
        elif 400 <= status < 600:
            self._refusal = []
        else:
            self._end(sse.NotLean(f"status {status}"))

    def _refused(self) -> None:
        assert self._refusal is not None
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self._headers]
        try:
            sse.refusal(self.request, self._status, headers, b"".join(self._refusal))
        except Exception as exc:
            self._end(exc)

    def _lines_in(self, lines: list[str], now: float) -> None:
        """The answer's new lines: their deltas to the sink, then the flush and the pace. The
        deltas read before a line that fails still reach the sink first, as they would from
        huggingface_hub's iterator."""
        parse, take, data = self.stream.parse, self.stream.take, self._data
        deltas: list[str] = []
        failure: Exception | None = None
        try:
            for line in lines:
                if data.pick(line):
                    deltas += take(parse(line))
                elif data.done:
                    break
        except Exception as exc:
            failure = exc
        if deltas:
            try:
                for i, delta in enumerate(deltas):
                    if NUL in delta:
                        deltas[i] = delta.replace(NUL, REPLACEMENT)
                self.sink.took(deltas, now)
            except Exception as exc:
                failure = exc
        if failure is not None:
            self._end(failure)
        elif data.done:
            self._end(None)
        elif deltas:
            self._paced(len(deltas), now)

    def _paced(self, count: int, now: float) -> None:
        """After a read of `count` tokens: flush now, or pause until the next tick, or until
        just before the stream's end when that comes first?"""
        publisher = self.publisher
        if publisher is None:
            return
        if not self._tokens:
            self._first_at = now
        self._tokens += count
        if not publisher.showed_tokens or publisher.pending >= self.engine.flush_max_tokens:
            self.engine.flush_soon(self)
            return
        if self._tokens < 2:
            return  # no pace known yet: read on
        gap = (now - self._first_at) / (self._tokens - 1)
        # When the next to last token should come, at the pace so far (the stream's `done`
        # must not wait for the tick; a token early, as the pace read on a late read is slow).
        end = self._first_at + (self.sink.max_tokens - 2) * gap - now
        tick = self.engine.next_tick - now
        wait = min(tick, end)
        if wait < MIN_PAUSE_S:
            return  # read on
        # Read on where the buffer would fill meanwhile (the tokens pending now go in the
        # tick's flush, due in a moment).
        pending = 0 if self.engine.tick_flushing else publisher.pending
        if gap and pending + wait / gap >= self.engine.flush_max_tokens:
            return
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()
            self.engine.pause(self)
            if end < tick:
                self._wake = self._loop.call_later(end, self.resume)

    def resume(self) -> None:
        self._unwake()
        if self._paused:
            self._paused = False
            if self._transport is not None and self._ended is None:
                self._transport.resume_reading()

    def _unwake(self) -> None:
        """Drop the timer that would end a pause before the tick."""
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None

    # Writes -----------------------------------------------------------------------------------

    def flush_due(self) -> bool:
        return (
            self.publisher is not None
            and not self._writing
            and not self._settled
            and not self._in_db  # the tokens left go with the closing events, after it
            and (
                self.publisher.pending > 0
                or self.publisher.replaying
                or self.publisher.leading
                or self._closing_due
            )
        )

    def publisher_keys(self) -> list[str]:
        assert self.publisher is not None
        return self.publisher.keys

    def batch(self) -> tuple[list[Any], list[str], Also | None]:
        """This stream's write: its lead events and pending tokens (after the whole text,
        after a failure or a lost stream), and the commands that go with them."""
        publisher = self.publisher
        assert publisher is not None
        self._writing = True
        events, deltas = publisher.take()
        return publisher.args(events), deltas, publisher.take_also()

    def written(self, flag: Any, deltas: list[str]) -> None:
        self._writing = False
        publisher = self.publisher
        assert publisher is not None
        if isinstance(flag, Exception):
            self.write_failed(deltas, flag, fatal=True)
            return
        self._outage_since = None
        try:
            cancelled = publisher.wrote(flag, deltas)
        except ClaimLost as exc:
            self._fail(exc)
        except StreamLost:
            self.engine.flush_soon(self)  # the whole text again, then what this write held
        else:
            self._closing_due = False
            if cancelled:
                self._end(None, cancelled=True)
            elif publisher.pending and (
                not publisher.showed_tokens or publisher.pending >= self.engine.flush_max_tokens
            ):
                self.engine.flush_soon(self)  # tokens read while this write was out
        self._settle()

    def write_failed(self, deltas: list[str], exc: Exception, fatal: bool = False) -> None:
        """The write did not happen, or may have: its tokens are written again, after the
        whole text (`TokenPublisher.send` does the same on a thread)."""
        self._writing = False
        assert self.publisher is not None
        self.publisher.failed(deltas)
        if fatal:
            self._fail(exc)
        else:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
            self.outage_check()
        self._settle()

    def outage_check(self) -> None:
        since = self._outage_since
        if since is not None and time.monotonic() - since > self.engine.outage_s:
            self._fail(RedisUnavailable(f"Redis unreachable for {self.engine.outage_s:.0f} s"))

    # The end ----------------------------------------------------------------------------------

    def abort(self) -> None:
        self._aborted = True
        if self._transport is not None:
            self._transport.abort()  # connection_lost ends the stream
        else:  # still connecting: a connection made later is closed at once
            self._end(httpx2.ReadError("the stream was aborted"))

    def _end(
        self,
        failure: BaseException | None,
        cause: BaseException | None = None,
        *,
        cancelled: bool = False,
    ) -> None:
        """The stream's end (once): its connection closes; its thread learns of it once no
        write of its tokens is in flight (the thread's own writes must come after)."""
        if self._ended is not None:
            return
        if failure is not None and cause is not None and failure is not cause:
            failure.__cause__ = cause
        if failure is not None and self._aborted and not isinstance(failure, ClaimLost):
            failure = httpx2.ReadError("the stream was aborted")
        self._ended = (cancelled, failure)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unwake()
        if self._transport is not None:
            self._transport.abort()
        self._settle()

    def _fail(self, failure: BaseException) -> None:
        """A failure of a write: the stream's end, or, once the job's end was recorded, the
        end of its closing write (tried no more)."""
        if self._closing_due:
            self._closing_due = False
            self._ended = (False, failure)
        else:
            self._end(failure)

    def _settle(self) -> None:
        if self._ended is None or self._writing or self._settled or self._in_db:
            return
        if self._closing_due:
            return  # the job's closing write is still to go (or to be tried again)
        if self._ended == (False, None) and not self._asked_end:
            self._asked_end = True
            if self._end_on_loop():
                return
        self._settled = True
        self.engine.left(self)
        cancelled, failure = self._ended
        assert self.relay is not None
        if failure is None:
            self.relay.future.set_result(cancelled)
        else:
            self.relay.future.set_exception(failure)

    def _end_on_loop(self) -> bool:
        """A stream that ended well: the job ends here, its row finished, then its closing
        events written after its last tokens (where the process has a loop finish). True
        while that is under way."""
        if self.engine.finishes is None or self.publisher is None:
            return False
        try:
            end = self.sink.ending()
        except Exception as exc:
            self._ended = (False, exc)
            return False
        if end is None:
            return False
        self._in_db = True
        self._loop.create_task(self._finish(self.engine.finishes, end))
        return True

    async def _finish(self, finishes: LoopFinish, end: LoopEnd) -> None:
        assert self.relay is not None and self.publisher is not None
        try:
            finished = await finishes.finish(end.claim, end.outcome)
        except Exception as exc:
            # Postgres unreachable, say: the thread finishes the job, as it would have.
            log.warning("finishing the job on the stream loop failed: %s", exc)
            finished = None
        self._in_db = False
        self.relay.finished = finished
        if finished:
            self.publisher.close_with(end.outcome.closing_events(), end.also)
            self._closing_due = True
            self.engine.flush_soon(self)
        self._settle()
