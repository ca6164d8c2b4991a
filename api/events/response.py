"""A lean text/event-stream response for every event stream (the job event streams, which
one process holds by the thousand, and the OpenAI-compatible streams).

sse-starlette's EventSourceResponse runs four tasks per connection (stream, ping,
disconnect, shutdown) and wraps every send in a cancel scope; at thousands of clients
those per-send costs were a fifth of the API's CPU (see the README's performance section).
Here a connection costs one extra task, the disconnect watcher (api.disconnect), which
cancels the stream; each chunk is one ASGI send, pulled from its source with a plain
coroutine call. Events are still rendered by sse-starlette's ServerSentEvent, once per
event for all readers (api.events.wire), and keep-alives come from the source
(api.events.router), not from a timer per connection.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from types import FrameType
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from api.disconnect import DisconnectWatcher

log = logging.getLogger("inferq.api")

# The signals on which uvicorn starts its graceful shutdown.
EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ChunkSource(Protocol):
    async def next_chunk(self) -> bytes | None:
        """The next bytes to send, or None at the end of the stream."""

    async def aclose(self) -> None: ...


class GeneratorSource:
    """A chunk source over an async generator of chunks."""

    def __init__(self, chunks: AsyncGenerator[bytes]) -> None:
        self._chunks = chunks

    async def next_chunk(self) -> bytes | None:
        return await anext(self._chunks, None)

    async def aclose(self) -> None:
        await self._chunks.aclose()


class EventStream(Response):
    """Sends each chunk of `source` as it comes; a client disconnect ends it quietly.

    `on_disconnect` runs once the stream is closed if its client left before the end.
    `send_timeout` bounds each send (off by default: a timer per send is what the lean
    response avoids; a stalled reader of a job stream costs only the hub's bounded backlog).
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        source: ChunkSource,
        headers: Mapping[str, str],
        on_disconnect: Callable[[], Awaitable[None]] | None = None,
        send_timeout: float | None = None,
    ) -> None:
        # As StreamingResponse does: no body, so no Content-Length.
        self.source = source
        self.status_code = 200
        self.background = None
        self.on_disconnect = on_disconnect
        self.send_timeout = send_timeout
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.send_timeout is not None:
            send = _within(self.send_timeout, send)
        client = DisconnectWatcher(receive)
        try:
            async with client:
                await self._stream(send)
        finally:
            await self.source.aclose()
        if client.gone and self.on_disconnect is not None:
            await self.on_disconnect()

    async def _stream(self, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        await send(start)
        while True:
            try:
                chunk = await self.source.next_chunk()
            except Exception:
                # Past the headers no error can be answered; a stream that ends cleanly
                # is one its client resumes (Last-Event-ID), a cut one reads as a failure.
                log.exception("event stream failed; ending it")
                break
            if chunk is None:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _within(seconds: float, send: Send) -> Send:
    """`send`, each call bounded by `seconds` (a reader that stalls that long is dropped)."""

    async def timed(message: Message) -> None:
        async with asyncio.timeout(seconds):
            await send(message)

    return timed


def drain_on_exit_signal(drain: Callable[[], None]) -> Callable[[], None]:
    """Call `drain` on this event loop as soon as the server is told to stop; returns undo.

    uvicorn waits for open responses before it runs the lifespan's shutdown, and an event
    stream is open until its job ends: without a word from the signal itself, the streams
    would run into the graceful-shutdown timeout and be cut mid-body. The server's own
    handler (uvicorn's, installed before the lifespan starts) is wrapped, not replaced.
    Signals reach only the main thread; elsewhere (a server in a thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    wrapped: dict[int, Callable[[int, FrameType | None], Any]] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(drain)
        wrapped[signum](signum, frame)

    for signum in EXIT_SIGNALS:
        previous = signal.getsignal(signum)
        if callable(previous):  # a Python handler, such as the server's; never a default
            wrapped[signum] = previous
            signal.signal(signum, on_signal)

    def undo() -> None:
        for signum, previous in wrapped.items():
            if signal.getsignal(signum) is on_signal:
                signal.signal(signum, previous)

    return undo
