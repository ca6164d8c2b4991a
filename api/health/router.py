"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import StateDep
from api.state import AppState

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _check(name: str, probe: Awaitable[object]) -> tuple[str, str]:
    try:
        async with asyncio.timeout(2.0):
            await probe
        return name, "ok"
    except Exception as exc:
        return name, f"error: {exc.__class__.__name__}: {exc}"


async def _postgres(state: AppState) -> None:
    async with state.engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def _broker(state: AppState) -> None:
    await state.broker.ping()


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    results = dict(
        await asyncio.gather(
            _check("postgres", _postgres(state)),
            _check("redis", state.redis.ping()),
            _check("broker", _broker(state)),
        )
    )
    ok = all(v == "ok" for v in results.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": results}, 200 if ok else 503
    )


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
