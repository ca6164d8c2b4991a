"""The simulator's ASGI app and its uvicorn runner."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from sim import chat, generate, meta
from sim.config import SimConfig
from sim.errors import BodyRejection, SimError
from sim.service import Simulator


def create_app(config: SimConfig) -> Starlette:
    """A TGI-compatible app backed by a fresh simulator."""
    sim = Simulator(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await sim.engine.stop()

    app = Starlette(
        routes=_routes(),
        exception_handlers={SimError: _sim_error, BodyRejection: _body_rejection},
        lifespan=lifespan,
    )
    app.state.sim = sim
    return app


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8081) -> None:
    """Run the simulator with uvicorn until interrupted."""
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning")


def _routes() -> list[Route]:
    return [
        Route("/", generate.compat_generate, methods=["POST"]),
        Route("/generate", generate.generate, methods=["POST"]),
        Route("/generate_stream", generate.generate_stream, methods=["POST"]),
        Route("/v1/chat/completions", chat.chat_completions, methods=["POST"]),
        Route("/tokenize", meta.tokenize, methods=["POST"]),
        Route("/", meta.health, methods=["GET"]),
        Route("/health", meta.health, methods=["GET"]),
        Route("/ping", meta.health, methods=["GET"]),
        Route("/info", meta.info, methods=["GET"]),
        Route("/metrics", meta.metrics, methods=["GET"]),
        Route("/v1/models", meta.models, methods=["GET"]),
        Route("/sim/state", meta.sim_state, methods=["GET"]),
        Route("/sim/last_request", meta.last_request, methods=["GET"]),
        Route("/sim/faults", meta.get_faults, methods=["GET"]),
        Route("/sim/faults", meta.set_faults, methods=["POST"]),
        Route("/sim/faults", meta.clear_faults, methods=["DELETE"]),
    ]


async def _sim_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SimError)
    return JSONResponse(exc.payload(), status_code=exc.status_code)


async def _body_rejection(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BodyRejection)
    return PlainTextResponse(exc.text, status_code=exc.status_code)
