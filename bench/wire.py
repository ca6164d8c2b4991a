"""Lean HTTP/1.1 clients for the load generators: one asyncio protocol per connection.

The load generators share the machine's CPU with the platform, so a request or an event
must cost the client far less than it costs the server. httpx (with httpx-sse) spends about
as much CPU per event or per submit as the API does: the fan-out's four client processes
used more CPU than the API process, and the submit phase's client half a core. These
clients leave HTTP framing (chunked encoding included) to httptools, the C parser uvicorn
uses: an SSE reader that only splits frames, and a keep-alive connection for submits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools


@dataclass(frozen=True, slots=True)
class Frame:
    event: str
    id: str | None
    data: str
    received: float  # time.time() when its bytes arrived


OnFrame = Callable[[Frame], None]


def parse_frame(block: bytes, received: float) -> Frame | None:
    """One SSE event block (lines, no blank line); None for a comment-only block."""
    event, id_, data = "message", None, []
    for line in block.decode().split("\n"):
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "id":
            id_ = value
        elif name == "data":
            data.append(value)
    if id_ is None and not data:
        return None
    return Frame(event, id_, "\n".join(data), received)


class _SseProtocol(asyncio.Protocol):
    def __init__(self, request: bytes, on_frame: OnFrame) -> None:
        loop = asyncio.get_running_loop()
        self.request = request
        self.on_frame = on_frame
        self.parser = httptools.HttpResponseParser(self)
        self.status: asyncio.Future[int] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or ConnectionError("connection closed before the response"))

    # httptools callbacks
    def on_headers_complete(self) -> None:
        if not self.status.done():
            self.status.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        received = time.time()
        blocks = (self.pending + body).replace(b"\r\n", b"\n").split(b"\n\n")
        self.pending = blocks.pop()
        for block in blocks:
            frame = parse_frame(block, received)
            if frame is not None:
                self.on_frame(frame)

    def on_message_complete(self) -> None:
        self._end(None)

    def _end(self, exc: BaseException | None) -> None:
        if not self.status.done():
            self.status.set_exception(exc or ConnectionError("no response"))
        if not self.finished.done():
            self.finished.set_result(None)
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True)
class OpenStream:
    status: int
    finished: asyncio.Future[None]  # done when the server ends the stream or the link drops


@contextlib.asynccontextmanager
async def event_stream(
    url: str, headers: dict[str, str], on_frame: OnFrame, *, json_body: bytes | None = None
) -> AsyncIterator[OpenStream]:
    """GET `url` (or POST `json_body` to it) as an event stream; frames go to `on_frame` as
    they arrive, inside the read that brought them.

    Leaving the block hangs up.
    """
    headers = {**headers, "Accept": "text/event-stream"}
    if json_body is None:
        request = request_bytes("GET", url, headers)
    else:
        headers["Content-Type"] = "application/json"
        request = request_bytes("POST", url, headers, json_body)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: _SseProtocol(request, on_frame), *_address(url)
    )
    try:
        yield OpenStream(await protocol.status, protocol.finished)
    finally:
        transport.close()


def request_bytes(method: str, url: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method != "GET":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "localhost", parts.port or 80


class _ExchangeProtocol(asyncio.Protocol):
    """Request, response, request, ... on one kept-alive connection."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.response: asyncio.Future[tuple[int, bytes]] | None = None
        self.body = bytearray()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("connection closed")
        self._fail(self.lost)

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.response is not None and not self.response.done():
            self.response.set_result((self.parser.get_status_code(), bytes(self.body)))
        self.body.clear()

    def _fail(self, exc: BaseException) -> None:
        if self.response is not None and not self.response.done():
            self.response.set_exception(exc)


class KeepAlive:
    """One HTTP/1.1 connection used for one request at a time, as a closed-loop client is.

    A connection idle for `max_idle_s` is replaced rather than reused: uvicorn closes one
    after 5 s, and a request sent as it does so would be reset.
    """

    def __init__(self, url: str, headers: dict[str, str], max_idle_s: float = 4.0) -> None:
        self.url, self.headers = url, headers
        self.max_idle_s = max_idle_s
        self._protocol: _ExchangeProtocol | None = None
        self._last_used = 0.0

    async def post_json(
        self, path: str, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """POST `body` (JSON) to `path`, with `headers` over the connection's own; the status
        and the response body."""
        protocol = self._protocol
        if protocol is not None and time.monotonic() - self._last_used > self.max_idle_s:
            self.close()
            protocol = None
        if protocol is None or protocol.lost is not None:
            loop = asyncio.get_running_loop()
            _, protocol = await loop.create_connection(_ExchangeProtocol, *_address(self.url))
            self._protocol = protocol
        headers = {**self.headers, **(headers or {}), "Content-Type": "application/json"}
        protocol.response = asyncio.get_running_loop().create_future()
        assert protocol.transport is not None
        protocol.transport.write(request_bytes("POST", self.url + path, headers, body))
        try:
            return await protocol.response
        finally:
            self._last_used = time.monotonic()

    @staticmethod
    @contextlib.contextmanager
    def many(url: str, headers: dict[str, str], count: int) -> Iterator[list[KeepAlive]]:
        """`count` connections (one per closed-loop client), all closed on leaving."""
        connections = [KeepAlive(url, headers) for _ in range(count)]
        try:
            yield connections
        finally:
            for connection in connections:
                connection.close()

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
