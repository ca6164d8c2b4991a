"""A lean text/event-stream response for the job event streams, which one process holds by
the thousand.

sse-starlette's EventSourceResponse runs four tasks per connection (stream, ping,
disconnect, shutdown) and wraps every send in a cancel scope; at thousands of clients
those per-send costs were a fifth of the API's CPU (see the README's performance section).
Here a connection costs one extra task, which waits for the disconnect and cancels the
stream; each chunk is one ASGI send, pulled from its source with a plain coroutine call.
Events are still rendered by sse-starlette's ServerSentEvent, once per event for all
readers (api.events.wire), and keep-alives come from the source (api.events.router), not
from a timer per connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class ChunkSource(Protocol):
    async def next_chunk(self) -> bytes | None:
        """The next bytes to send, or None at the end of the stream."""

    async def aclose(self) -> None: ...


class EventStream(Response):
    """Sends each chunk of `source` as it comes; a client disconnect ends it quietly."""

    media_type = "text/event-stream"

    def __init__(self, source: ChunkSource, headers: Mapping[str, str]) -> None:
        # As StreamingResponse does: no body, so no Content-Length.
        self.source = source
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.current_task()
        assert stream is not None
        gone = asyncio.Event()
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, stream, gone))
        try:
            start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
            await send(start)
            while (chunk := await self.source.next_chunk()) is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Our own cancellation (the client left) ends the response; any other goes on.
            if not gone.is_set() or stream.uncancel() > 0:
                raise
        finally:
            watcher.cancel()
            await self.source.aclose()


async def _cancel_on_disconnect(
    receive: Receive, stream: asyncio.Task[object], gone: asyncio.Event
) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    stream.cancel()
