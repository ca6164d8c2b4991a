"""The FastAPI application factory: `uvicorn --factory api.main:create_app`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import console, errors, openapi
from api.admin.router import router as admin_router
from api.events.response import drain_on_exit_signal
from api.events.router import router as events_router
from api.health.queues import QueueDepthMonitor
from api.health.router import router as health_router
from api.jobs.router import router as jobs_router
from api.limits import RateLimitHeaders
from api.openai.router import router as openai_router
from api.state import AppState
from api.stats.router import router as stats_router
from api.webhooks.router import router as webhooks_router
from inferq.collector import quiet_collector
from inferq.logs import configure_logging
from inferq.settings import Settings, get_settings

MAX_BODY_BYTES = 4 * 1024 * 1024


class BodyLimit:
    """Refuse bodies over the limit before the app, and authentication, see them.

    A declared Content-Length over the limit is refused unread. A body without one
    (chunked) is read here first, its bytes counted as they arrive, and refused as soon as
    it passes the limit; the app then reads the buffered body as if from the socket.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _too_large(send, self.limit)
            return
        if length is not None or scope["method"] in ("GET", "HEAD"):
            # No route reads a GET body, and the event streams skip the extra step.
            await self.app(scope, receive, send)
            return
        received = await _receive_within(receive, self.limit)
        if received is None:
            await _too_large(send, self.limit)
            return
        await self.app(scope, _replay(received, receive), send)


async def _receive_within(receive: Receive, limit: int) -> list[Message] | None:
    """The request's body messages, or None once their bytes pass `limit`."""
    received: list[Message] = []
    size = 0
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":  # the client left
            return received
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if not message.get("more_body", False):
            return received


async def _too_large(send: Send, limit: int) -> None:
    body = (
        b'{"error":{"type":"request_too_large","message":"the body is over '
        + str(limit).encode()
        + b' bytes"}}'
    )
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _replay(received: list[Message], receive: Receive) -> Receive:
    pending = list(received)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        state = AppState.create(settings)
        await state.start()
        undo_drain = drain_on_exit_signal(state.hub.drain)  # end SSE streams at SIGTERM
        queue_depth = QueueDepthMonitor(state.redis, state.registry)
        queue_depth.start()
        app.state.inferq = state
        quiet_collector()
        try:
            yield
        finally:
            await queue_depth.close()
            undo_drain()
            await state.close()

    # Metrics are Prometheus's (/metrics); FastAPI's OpenTelemetry hooks would only cost a
    # provider lookup on every request.
    telemetry: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(title="inferq", version="0.1.0", lifespan=lifespan, telemetry=telemetry)
    errors.install(app)
    openapi.install(app)
    console.install(app)  # the web console at `/`, outside the schema
    for router in (
        jobs_router,
        events_router,
        openai_router,
        admin_router,
        webhooks_router,
        stats_router,
        health_router,
    ):
        app.include_router(router, responses=_responses(router))
    app.add_middleware(RateLimitHeaders)  # on every answer to a submit of a limited key
    app.add_middleware(BodyLimit)
    app.add_middleware(errors.CatchAll)  # outermost: whatever escapes is still JSON
    return app


def _responses(router: APIRouter) -> openapi.Responses | None:
    """The statuses each router's routes answer, for routers that do not declare them."""
    if router is events_router:
        stream = openapi.event_stream("The job's events as server-sent events")
        # 204: the client resumed after the job's last event and has it all; a browser's
        # EventSource stops reconnecting on a 204.
        complete: openapi.Responses = {204: {"description": "The job ended; the client has it all"}}
        return {**stream, **complete, **openapi.error_responses(*openapi.AUTHENTICATED, 404)}
    if router is admin_router:
        return openapi.error_responses(*openapi.AUTHENTICATED, 403, 404, 413)
    if router is webhooks_router:
        return openapi.error_responses(*openapi.AUTHENTICATED)
    return None
