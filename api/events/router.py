"""GET /v1/jobs/{id}/events: the job's events as server-sent events, resumable."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query

from api.deps import CurrentKey, SessionDep, StateDep
from api.errors import InvalidRequest
from api.events.response import EventStream
from api.events.service import JobEvents
from api.events.wire import encode
from api.jobs.service import get_job
from inferq.metrics import SSE_CONNECTIONS

router = APIRouter(prefix="/v1/jobs", tags=["events"])

PING = b": ping\r\n\r\n"
STREAM_ID = re.compile(r"^\d+(-\d+)?$")


def _resume_point(last_event_id: str | None, after: str | None) -> str | None:
    value = last_event_id or after
    if value is not None and not STREAM_ID.match(value):
        raise InvalidRequest(f"not an event id: {value!r} (expected 'ms-seq')")
    return value


async def _sse(events: JobEvents, ping_seconds: float) -> AsyncIterator[bytes]:
    """Each group of events that arrived together goes out in one write.

    A stream with nothing to say gets a comment line now and then, so that proxies keep it
    open; the hub wakes idle readers every few seconds, which is the clock for it.
    """
    SSE_CONNECTIONS.inc()
    last_write = time.monotonic()
    try:
        async for batch in events.batches():
            if batch:
                yield b"".join(encode(event) for event in batch)
            elif time.monotonic() - last_write >= ping_seconds:
                yield PING
            else:
                continue
            last_write = time.monotonic()
    finally:
        SSE_CONNECTIONS.dec()


@router.get("/{job_id}/events")
async def job_events(
    job_id: uuid.UUID,
    key: CurrentKey,
    session: SessionDep,
    state: StateDep,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[str | None, Query(description="resume after this event id")] = None,
) -> EventStream:
    """Server-sent events: status, token, reset, done, error; resume with Last-Event-ID."""
    job = await get_job(session, key, job_id)  # 404 unless the job is this tenant's
    resume = _resume_point(last_event_id, after)
    events = JobEvents(state.redis, state.hub, state.sessions, job_id, resume, snapshot=job)
    return EventStream(
        _sse(events, state.settings.sse_ping_seconds),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
