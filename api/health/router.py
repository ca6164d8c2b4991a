"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from sqlalchemy import text

from api.deps import StateDep
from api.errors import ErrorDetail, ServiceUnavailable
from api.openapi import RETRY_AFTER
from api.state import AppState
from inferq.metrics import exposition

log = logging.getLogger("inferq.api")

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, Literal["ok", "down"]]
    down: list[str]  # the names of the checks that failed
    error: ErrorDetail | None = None


async def _check(name: str, probe: Awaitable[object]) -> tuple[str, Literal["ok", "down"]]:
    try:
        async with asyncio.timeout(2.0):
            await probe
        return name, "ok"
    except Exception as exc:
        # The reason stays in the log: it names hosts, and the caller may be anyone.
        log.warning("readiness check failed: %s: %s: %s", name, exc.__class__.__name__, exc)
        return name, "down"


async def _postgres(state: AppState) -> None:
    async with state.engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def _broker(state: AppState) -> None:
    await state.broker.ping()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {"model": Readiness, "description": "A dependency is down", "headers": RETRY_AFTER}
    },
)
async def readyz(state: StateDep) -> JSONResponse:
    """Whether Postgres, Redis and the broker answer; a 503 names the ones that do not."""
    checks = dict(
        await asyncio.gather(
            _check("postgres", _postgres(state)),
            _check("redis", state.redis.ping()),
            _check("broker", _broker(state)),
        )
    )
    down = [name for name, result in checks.items() if result != "ok"]
    if not down:
        return JSONResponse(Readiness(status="ok", checks=checks, down=[]).model_dump())
    error = ServiceUnavailable(f"{' and '.join(down)} {'is' if len(down) == 1 else 'are'} down")
    body = Readiness(status="unavailable", checks=checks, down=down, error=error.detail)
    return JSONResponse(body.model_dump(), 503, headers=error.headers)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics() -> Response:
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)
