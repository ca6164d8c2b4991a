"""GET /v1/jobs/{id}/events: the job's events as server-sent events, resumable."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query

from api.deps import CurrentKey, SessionDep, StateDep
from api.errors import InvalidRequest
from api.events.response import EventStream
from api.events.service import JobEvents
from api.events.wire import encode
from api.jobs.service import job_if_unseen
from inferq.metrics import SSE_CONNECTIONS

router = APIRouter(prefix="/v1/jobs", tags=["events"])

PING = b": ping\r\n\r\n"
STREAM_ID = re.compile(r"^\d+(-\d+)?$")


def _resume_point(last_event_id: str | None, after: str | None) -> str | None:
    value = last_event_id or after
    if value is not None and not STREAM_ID.match(value):
        raise InvalidRequest(f"not an event id: {value!r} (expected 'ms-seq')")
    return value


class SseFeed:
    """A job's events as SSE chunks: each group of events that arrived together is one write.

    A stream with nothing to say gets a comment line now and then, so that proxies keep it
    open; the hub wakes idle readers every few seconds, which is the clock for it.
    """

    def __init__(self, events: JobEvents, ping_seconds: float) -> None:
        self.events = events
        self.ping_seconds = ping_seconds
        self.started = False
        self.last_write = time.monotonic()

    async def next_chunk(self) -> bytes | None:
        if not self.started:
            self.started = True
            SSE_CONNECTIONS.inc()
            replayed = await self.events.start()
            if replayed:
                return self._wrote(b"".join(encode(event) for event in replayed))
        while not self.events.ended:
            batch = await self.events.next()
            if batch:
                return self._wrote(b"".join(encode(event) for event in batch))
            if time.monotonic() - self.last_write >= self.ping_seconds:
                return self._wrote(PING)
        return None

    def _wrote(self, chunk: bytes) -> bytes:
        self.last_write = time.monotonic()
        return chunk

    async def aclose(self) -> None:
        if self.started:
            SSE_CONNECTIONS.dec()
        await self.events.close()


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
    snapshot = await job_if_unseen(state, session, key, job_id)
    resume = _resume_point(last_event_id, after)
    events = JobEvents(state.redis, state.hub, state.sessions, job_id, resume, snapshot)
    return EventStream(
        SseFeed(events, state.settings.sse_ping_seconds),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
