"""The API's pub/sub hub and event reader against a real Redis, without HTTP in between."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from api.events import hub as hub_module
from api.events import router as events_router
from api.events.hub import Hub
from api.events.service import JobEvents
from inferq.events import (
    PUBLISH_SCRIPT,
    Event,
    EventType,
    script_args,
    script_keys,
    terminal_events,
)
from tests.servers import Databases


@contextlib.asynccontextmanager
async def running_hub(databases: Databases) -> AsyncIterator[tuple[aioredis.Redis, Hub]]:
    redis = aioredis.Redis.from_url(databases.redis_url, decode_responses=True)
    hub = Hub(redis)
    await hub.start()
    try:
        yield redis, hub
    finally:
        await hub.close()
        await redis.aclose()


# With the periodic catch-up pushed out of reach, only the hub's overflow signal can bring
# the reader the events it missed; were it broken, the test would hang into this timeout.
@pytest.mark.timeout(30)
async def test_a_reader_that_falls_behind_catches_up_from_the_stream(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "LIVE_BACKLOG", 4)
    monkeypatch.setattr(hub_module, "QUIET_SECONDS", 3600)
    async with running_hub(databases) as (redis, hub):
        job_id = uuid.uuid4()
        publish = redis.register_script(PUBLISH_SCRIPT)
        reader = JobEvents(redis, hub, None, job_id, None)  # type: ignore[arg-type]
        batches = reader.batches()
        texts = [f" t{i}" for i in range(40)]
        first = [Event.make(EventType.status, status="running")]
        await publish(keys=script_keys(str(job_id)), args=script_args(first, 1000, 0))
        assert [e.type for e in await anext(batches)] == [EventType.status]
        # Forty flushes while the reader is busy elsewhere: far more than its backlog holds.
        for text in texts:
            token = [Event.make(EventType.token, text=text)]
            await publish(keys=script_keys(str(job_id)), args=script_args(token, 1000, 0))
        end = terminal_events("succeeded", "length", {"output_tokens": 40})
        await publish(keys=script_keys(str(job_id)), args=script_args(end, 1000, 60))
        received = [e async for batch in batches for e in batch]
    tokens = [e.payload()["text"] for e in received if e.type is EventType.token]
    assert "".join(tokens) == "".join(texts)
    assert received[-1].type is EventType.done
    assert hub.listeners == 0


async def test_readers_of_a_quiet_channel_re_read_the_stream(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event published while nobody could hear it (pub/sub is at most once) still arrives."""
    monkeypatch.setattr(hub_module, "QUIET_SECONDS", 0.2)
    async with running_hub(databases) as (redis, hub):
        job_id = str(uuid.uuid4())
        reader = JobEvents(redis, hub, None, uuid.UUID(job_id), None)  # type: ignore[arg-type]
        batches = reader.batches()
        start = [Event.make(EventType.status, status="running")]
        publish = redis.register_script(PUBLISH_SCRIPT)
        await publish(keys=script_keys(job_id), args=script_args(start, 1000, 0))
        assert [e.type for e in await anext(batches)] == [EventType.status]
        # Written to the stream only, as if the PUBLISH had been lost in a reconnect.
        end = terminal_events("succeeded", "length", {"output_tokens": 0})
        for event in end:
            await redis.xadd(script_keys(job_id)[0], {"e": event.type.value, "d": event.data})
        received = [e async for batch in batches for e in batch]
    assert [e.type for e in received] == [EventType.status, EventType.done]


async def test_an_idle_event_stream_sends_keep_alive_comments(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No timer per connection: the hub's wake-up of idle readers is the keep-alive's clock."""
    monkeypatch.setattr(hub_module, "QUIET_SECONDS", 0.1)
    async with running_hub(databases) as (redis, hub):
        job_id = str(uuid.uuid4())
        publish = redis.register_script(PUBLISH_SCRIPT)
        start = [Event.make(EventType.status, status="running")]
        await publish(keys=script_keys(job_id), args=script_args(start, 1000, 0))
        reader = JobEvents(redis, hub, None, uuid.UUID(job_id), None)  # type: ignore[arg-type]
        feed = events_router.SseFeed(reader, ping_seconds=0.3)
        try:
            assert b"event: status" in (await feed.next_chunk() or b"")
            assert await feed.next_chunk() == events_router.PING
            assert await feed.next_chunk() == events_router.PING
        finally:
            await feed.aclose()
    assert hub.listeners == 0
