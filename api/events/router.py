"""GET /v1/jobs/{id}/events: the job's events as server-sent events, resumable."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from api.deps import CurrentKey, StateDep
from api.errors import InvalidRequest, ServiceUnavailable
from api.events.hub import HubUnavailable
from api.events.response import EventStream
from api.events.service import JobEvents
from api.events.wire import encode
from api.jobs.service import job_if_unseen
from inferq.events import Event
from inferq.metrics import SSE_CONNECTIONS

router = APIRouter(prefix="/v1/jobs", tags=["events"])

PING = b": ping\r\n\r\n"
# A Redis stream id as Redis writes it: two unsigned 64-bit decimals, no sign, no leading
# zero, ASCII digits only (`\d` would take other scripts' digits, which Redis refuses).
STREAM_ID = re.compile(r"(0|[1-9][0-9]{0,19})(?:-(0|[1-9][0-9]{0,19}))?", re.ASCII)
ID_PART_MAX = 2**64 - 1


def _resume_point(last_event_id: str | None, after: str | None) -> str | None:
    """The id to resume after, checked before the stream starts: XRANGE refuses what is
    out of range, and that would only show once the response is under way."""
    value = last_event_id or after
    if value is None:
        return None
    match = STREAM_ID.fullmatch(value)
    if match is None:
        raise InvalidRequest(f"not an event id: {value[:64]!r} (expected 'ms-seq')")
    ms, seq = int(match[1]), int(match[2] or 0)
    # The stream is read after the id (exclusive), so the very last id has nothing after it.
    if ms > ID_PART_MAX or seq > ID_PART_MAX or (ms, seq) == (ID_PART_MAX, ID_PART_MAX):
        raise InvalidRequest(f"event id out of range: {value!r} (each part below 2^64)")
    return value


class SseFeed:
    """A job's events as SSE chunks: each group of events that arrived together is one write.

    A stream with nothing to say gets a comment line now and then, so that proxies keep it
    open; the hub wakes idle readers every few seconds, which is the clock for it. When the
    process stops, the hub wakes every reader and the feed ends without a `done`, so that
    the client resumes elsewhere with its Last-Event-ID.
    """

    def __init__(self, events: JobEvents, ping_seconds: float) -> None:
        self.events = events
        self.ping_seconds = ping_seconds
        self.started = False
        self.last_write = time.monotonic()
        self._replayed: list[Event] = []

    async def open(self) -> None:
        """Subscribe and replay, before the response starts: a failure is still an answer."""
        self.started = True
        SSE_CONNECTIONS.inc()
        try:
            self._replayed = await self.events.start()
        except HubUnavailable:
            await self.aclose()
            raise ServiceUnavailable.of("redis") from None
        except BaseException:
            await self.aclose()
            raise

    @property
    def has_replay(self) -> bool:
        return bool(self._replayed)

    async def next_chunk(self) -> bytes | None:
        if not self.started:
            await self.open()
        if self._replayed:
            replayed, self._replayed = self._replayed, []
            return self._wrote(b"".join(encode(event) for event in replayed))
        hub = self.events.hub
        while not self.events.ended and not hub.draining:
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
            self.started = False
            SSE_CONNECTIONS.dec()
        await self.events.close()


@router.get("/{job_id}/events")
async def job_events(
    job_id: uuid.UUID,
    key: CurrentKey,
    state: StateDep,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[str | None, Query(description="resume after this event id")] = None,
) -> Response:
    """Server-sent events: status, token, reset, done, error; resume with Last-Event-ID."""
    snapshot = await job_if_unseen(state, key, job_id)
    resume = _resume_point(last_event_id, after)
    events = JobEvents(state.link, state.hub, state.sessions, job_id, resume, snapshot)
    feed = SseFeed(events, state.settings.sse_ping_seconds)
    await feed.open()
    if events.ended and not feed.has_replay:
        await feed.aclose()
        return Response(status_code=204)
    return EventStream(feed, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
