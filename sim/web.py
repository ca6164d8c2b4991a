"""HTTP plumbing: axum-like body parsing, SSE framing, aborts and disconnect handling."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Coroutine
from typing import Any, TypeVar

import anyio
import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from sim.errors import BodyRejection, DropConnection
from sim.service import Generation, Simulator

# TGI (axum) sends an SSE comment this often when no event is due.
KEEPALIVE_S = 15.0
KEEPALIVE_EVENT = b":\n\n"
DONE_EVENT = b"data: [DONE]\n\n"
GARBAGE_EVENT = b'data: {"token": \n\n'  # the `garbage` fault: not JSON
SSE_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def simulator(request: Request) -> Simulator:
    """The simulator serving this app."""
    sim: Simulator = request.app.state.sim
    return sim


def sse_event(payload: object) -> bytes:
    """One SSE `data:` event, its JSON compact and UTF-8 as serde_json writes it."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def parse_body(request: Request, model: type[M]) -> M:
    """Parse a JSON body, rejecting it in plain text the way axum's `Json` extractor does."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (content_type == "application/json" or content_type.endswith("+json")):
        raise BodyRejection(415, "Expected request with `Content-Type: application/json`")
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BodyRejection(400, f"Failed to parse the request body as JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BodyRejection(
            422, f"Failed to deserialize the JSON body into the target type: {_first_error(exc)}"
        ) from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"])
    return f"{location}: {error['msg']}" if location else str(error["msg"])


class AbortableStreamingResponse(StreamingResponse):
    """A streaming response whose source may abort the connection with `DropConnection`.

    The source generator is always closed when the response ends, so its `finally`
    (which frees the engine slot) runs as soon as the client disconnects.
    """

    def __init__(self, source: AsyncGenerator[bytes, None], **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self._source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream in this task while a plain asyncio task waits for the client to leave and
        cancels the stream if it does. Starlette's own way, an anyio task group for every
        response, cost more of the simulator's CPU than the rest of a short stream."""
        streaming = asyncio.current_task()
        assert streaming is not None
        finished = gone = False

        async def watch() -> None:
            nonlocal gone
            await self.listen_for_disconnect(receive)
            if not finished:
                gone = True
                streaming.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not gone:
                raise
            streaming.uncancel()  # the client left: the stream ends here, as it should
        finally:
            finished = True
            watcher.cancel()
        if self.background is not None:
            await self.background()

    async def stream_response(self, send: Send) -> None:
        """Stream the source; on `DropConnection`, return without ending the body."""
        try:
            await super().stream_response(send)
        except DropConnection:
            # The server closes a connection whose response was never completed.
            return
        finally:
            with anyio.CancelScope(shield=True):
                await self._source.aclose()


def sse_response(source: AsyncGenerator[bytes, None]) -> AbortableStreamingResponse:
    """A `text/event-stream` response with TGI's headers."""
    return AbortableStreamingResponse(source, media_type="text/event-stream", headers=SSE_HEADERS)


def dropped_response() -> AbortableStreamingResponse:
    """A response that starts and then drops the connection."""
    return AbortableStreamingResponse(_drop(), media_type="application/json")


async def _drop() -> AsyncGenerator[bytes, None]:
    raise DropConnection()
    yield b""  # pragma: no cover - makes this an async generator


async def wait_for_output(
    request: Request, sim: Simulator, generation: Generation
) -> Response | None:
    """Wait for a whole generation; return the response to send instead if it has no output.

    That is a dropped connection for the `disconnect` fault, or nothing useful if the
    client went away (its slot is freed at once).
    """
    try:
        tokens = await unless_disconnected(request, generation.collect())
    except DropConnection:
        return dropped_response()
    finally:
        sim.finish(generation)
    return Response(status_code=499) if tokens is None else None


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Run `work`; cancel it and return None if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()
    return task.result() if task in done else None


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
