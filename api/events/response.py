"""A lean text/event-stream response for the job event streams, which one process holds by
the thousand.

sse-starlette's EventSourceResponse runs four tasks per connection (stream, ping,
disconnect, shutdown) and wraps every send in a cancel scope; at thousands of clients
those per-send costs were a fifth of the API's CPU (see the README's performance section).
Here a connection costs one extra task, which waits for the disconnect and cancels the
stream; each chunk is one ASGI send. Events are still rendered by sse-starlette's
ServerSentEvent, once per event for all readers (api.events.wire), and pings come from the
stream itself (api.events.router), not from a timer per connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStream(StreamingResponse):
    """Sends each chunk of `chunks` as it comes; a client disconnect ends it quietly."""

    body_iterator: AsyncIterator[bytes]

    def __init__(self, chunks: AsyncIterator[bytes], headers: Mapping[str, str]) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.current_task()
        assert stream is not None
        gone = asyncio.Event()
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, stream, gone))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Our own cancellation (the client left) ends the response; any other goes on.
            if not gone.is_set() or stream.uncancel() > 0:
                raise
        finally:
            watcher.cancel()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _cancel_on_disconnect(
    receive: Receive, stream: asyncio.Task[object], gone: asyncio.Event
) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    stream.cancel()
