"""The API's pub/sub hub and event reader against a real Redis, without HTTP in between."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from api.events import hub as hub_module
from api.events import router as events_router
from api.events import service as service_module
from api.events.hub import Hub, HubUnavailable
from api.events.service import JobEvents
from api.openai import service as openai_service
from inferq import resp
from inferq.db import async_sessions, make_async_engine
from inferq.events import (
    PUBLISH_SCRIPT,
    Event,
    EventType,
    channel,
    script_args,
    script_keys,
)
from inferq.lifecycle import Outcome
from inferq.models import Job, JobStatus
from inferq.protocol import StatusData, TokenData
from inferq.redis_clients import async_client
from inferq.resp import RespLink
from tests.conftest import Platform, submit
from tests.servers import Databases, free_port

# Each hub's connections carry a name of their own, to be found in CLIENT LIST.
HUB_CLIENT = "inferq-hub-test"


def _succeeded(output_tokens: int | None = None) -> list[Event]:
    """The closing events of a job that ended `length`, as a worker writes them."""
    outcome = Outcome(JobStatus.succeeded, finish_reason="length", output_tokens=output_tokens)
    return outcome.closing_events()


@contextlib.asynccontextmanager
async def running_hub(
    databases: Databases, url: str | None = None, subscribe_timeout: float = 10.0
) -> AsyncIterator[tuple[aioredis.Redis, Hub, RespLink]]:
    """The hub (its connection named HUB_CLIENT, through `url` when given), a client to
    publish with and a lean connection for readers' replays (both straight to Redis, never
    through `url`)."""
    redis = async_client(databases.redis_url, 16)
    hub = Hub(url or databases.redis_url, subscribe_timeout, name=HUB_CLIENT)
    link = RespLink(databases.redis_url)
    await hub.start()
    try:
        yield redis, hub, link
    finally:
        await hub.close()
        await link.close()
        await redis.aclose()


# With the periodic catch-up pushed out of reach, only the hub's overflow signal can bring
# the reader the events it missed; were it broken, the test would hang into this timeout.
@pytest.mark.timeout(30)
async def test_a_reader_that_falls_behind_catches_up_from_the_stream(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "LIVE_BACKLOG", 4)
    monkeypatch.setattr(hub_module, "QUIET_SECONDS", 3600)
    async with running_hub(databases) as (redis, hub, link):
        job_id = uuid.uuid4()
        publish = redis.register_script(PUBLISH_SCRIPT)
        reader = JobEvents(link, hub, None, job_id, None)  # type: ignore[arg-type]
        batches = reader.batches()
        texts = [f" t{i}" for i in range(40)]
        first = [Event.of(StatusData(status=JobStatus.running))]
        await publish(keys=script_keys(str(job_id)), args=script_args(first, 1000, 0))
        assert [e.type for e in await anext(batches)] == [EventType.status]
        # Forty flushes while the reader is busy elsewhere: far more than its backlog holds.
        for text in texts:
            token = [Event.of(TokenData(text=text))]
            await publish(keys=script_keys(str(job_id)), args=script_args(token, 1000, 0))
        end = _succeeded(output_tokens=40)
        await publish(keys=script_keys(str(job_id)), args=script_args(end, 1000, 60))
        received = [e async for batch in batches for e in batch]
    tokens = [e.parse(TokenData).text for e in received if e.type is EventType.token]
    assert "".join(tokens) == "".join(texts)
    assert received[-1].type is EventType.done
    assert hub.listeners == 0


async def test_readers_of_a_quiet_channel_re_read_the_stream(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event published while nobody could hear it (pub/sub is at most once) still arrives."""
    monkeypatch.setattr(hub_module, "QUIET_SECONDS", 0.2)
    async with running_hub(databases) as (redis, hub, link):
        job_id = str(uuid.uuid4())
        reader = JobEvents(link, hub, None, uuid.UUID(job_id), None)  # type: ignore[arg-type]
        batches = reader.batches()
        start = [Event.of(StatusData(status=JobStatus.running))]
        publish = redis.register_script(PUBLISH_SCRIPT)
        await publish(keys=script_keys(job_id), args=script_args(start, 1000, 0))
        assert [e.type for e in await anext(batches)] == [EventType.status]
        # Written to the stream only, as if the PUBLISH had been lost in a reconnect.
        end = _succeeded(output_tokens=0)
        for event in end:
            await redis.xadd(script_keys(job_id)[0], {"e": event.type.value, "d": event.data})
        received = [e async for batch in batches for e in batch]
    assert [e.type for e in received] == [EventType.status, EventType.done]


async def test_a_new_channel_is_woken_only_after_a_whole_quiet_sweep(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader who has just subscribed (and read the stream) is not sent to read it again by
    the next sweep, which may come at once; one whose channel stays quiet through a whole
    sweep is, as is one whose channel was fed and then went quiet."""
    monkeypatch.setattr(hub_module, "QUIET_SECONDS", 3600)  # sweeps run by hand
    async with running_hub(databases) as (redis, hub, _link):
        quiet, fed = str(uuid.uuid4()), str(uuid.uuid4())
        async with hub.subscribe(str(uuid.uuid4())):
            pass  # the hub is live (a reader who came sooner re-reads once it is)
        async with hub.subscribe(quiet) as waiting, hub.subscribe(fed) as reading:
            hub._sweep()
            publish = redis.register_script(PUBLISH_SCRIPT)
            start = [Event.of(StatusData(status=JobStatus.running))]
            await publish(keys=script_keys(fed), args=script_args(start, 1000, 0))
            assert [e.type for e in await reading.take() if e] == [EventType.status]
            assert waiting._events == []
            hub._sweep()
            assert waiting._events == [None]  # a whole sweep without a message
            assert reading._events == []  # fed since the last sweep
            hub._sweep()
            assert reading._events == [None]


@dataclass
class CountedSessions:
    """A session factory that counts the sessions it opens (each a read of a job's row)."""

    sessions: Callable[[], Any]
    opened: int = 0

    def __call__(self) -> Any:
        self.opened += 1
        return self.sessions()


@contextlib.asynccontextmanager
async def counted_sessions(platform: Platform) -> AsyncIterator[CountedSessions]:
    engine = make_async_engine(platform.database_url, pool_size=1)
    try:
        yield CountedSessions(async_sessions(engine))
    finally:
        await engine.dispose()


async def test_a_reader_of_a_queued_job_reads_its_row_less_often_as_it_waits(
    databases: Databases, platform: Platform, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet wake-up of a job without a stream reads the job's row, then not again before a
    wait that doubles; a wake-up that says events were lost reads it at once; a job that
    ended meanwhile without a stream (its closing events lost) is read in the end."""
    monkeypatch.setattr(hub_module, "QUIET_SECONDS", 3600)  # sweeps run by hand
    monkeypatch.setattr(service_module, "ROW_RECHECK_FIRST_S", 0.3)
    job_id = uuid.UUID(submit(http, model="parked", prompt="wait", max_tokens=2)["id"])
    async with counted_sessions(platform) as counted, running_hub(databases) as (_, hub, link):
        reader = JobEvents(link, hub, counted, job_id, None)  # type: ignore[arg-type]
        assert [e.type for e in await reader.start()] == [EventType.status]  # queued
        assert counted.opened == 1

        async def quiet() -> list[Event]:
            hub._sweep()
            return await reader.next()

        assert await quiet() == []  # the channel is new: no wake-up
        assert await quiet() == [] and counted.opened == 2  # quiet for a whole sweep: read
        assert await quiet() == [] and counted.opened == 2  # read lately: not again
        assert reader._live is not None
        reader._live.offer(None)  # as the hub's new connection says: events may be lost
        assert await reader.next() == [] and counted.opened == 3
        with psycopg.connect(platform.database_url, autocommit=True) as db:
            db.execute(
                "UPDATE jobs SET status = 'cancelled', finish_reason = 'cancelled',"
                " finished_at = now() WHERE id = %s",
                [job_id],
            )
        assert await quiet() == [] and counted.opened == 3  # the wait has doubled: 0.6 s
        await asyncio.sleep(0.65)
        ended = await quiet()
        assert counted.opened == 4
        assert [e.type for e in ended][-1] == EventType.done
        assert reader.ended
        await reader.close()


async def test_an_openai_stream_of_a_job_just_accepted_opens_without_reading_its_row(
    databases: Databases, platform: Platform, http: httpx.Client
) -> None:
    """The OpenAI routes stream the job they have just accepted: its status as accepted opens
    the stream, as the events route's does; a job this process did not accept is read."""
    job_id = uuid.UUID(submit(http, model="parked", prompt="accepted", max_tokens=2)["id"])
    accepted = Job(id=job_id, tenant="t", status=JobStatus.queued.value, attempts=0)
    async with counted_sessions(platform) as counted, running_hub(databases) as (_, hub, link):
        for fresh, expected_reads in (({job_id: accepted}, 0), ({}, 1)):
            state = SimpleNamespace(link=link, hub=hub, sessions=counted, fresh_jobs=fresh)
            counted.opened = 0
            events = openai_service.job_events(state, job_id)  # type: ignore[arg-type]
            assert [e.type for e in await events.start()] == [EventType.status]
            assert counted.opened == expected_reads
            await events.close()


async def test_an_idle_event_stream_sends_keep_alive_comments(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No timer per connection: the hub's wake-up of idle readers is the keep-alive's clock."""
    monkeypatch.setattr(hub_module, "QUIET_SECONDS", 0.1)
    async with running_hub(databases) as (redis, hub, link):
        job_id = str(uuid.uuid4())
        publish = redis.register_script(PUBLISH_SCRIPT)
        start = [Event.of(StatusData(status=JobStatus.running))]
        await publish(keys=script_keys(job_id), args=script_args(start, 1000, 0))
        reader = JobEvents(link, hub, None, uuid.UUID(job_id), None)  # type: ignore[arg-type]
        feed = events_router.SseFeed(reader, ping_seconds=0.3)
        try:
            assert b"event: status" in (await feed.next_chunk() or b"")
            assert await feed.next_chunk() == events_router.PING
            assert await feed.next_chunk() == events_router.PING
        finally:
            await feed.aclose()
    assert hub.listeners == 0


# --- the hub's connection to Redis drops ----------------------------------------------------


def _publisher(
    databases: Databases, job_id: str
) -> tuple[aioredis.Redis, Callable[[list[Event]], Awaitable[None]]]:
    redis = aioredis.Redis.from_url(databases.redis_url, decode_responses=True)
    script = redis.register_script(PUBLISH_SCRIPT)

    async def publish(events: list[Event]) -> None:
        await script(keys=script_keys(job_id), args=script_args(events, 1000, 0))

    return redis, publish


async def _hub_connection_id(admin: aioredis.Redis, other_than: str | None = None) -> str:
    """The id of the hub's pub/sub connection, once there is one (a new one: `other_than`)."""
    deadline = time.monotonic() + 15
    while True:
        for client in await admin.client_list():
            subscribed = int(client.get("sub", 0)) > 0
            if client.get("name") == HUB_CLIENT and subscribed and client["id"] != other_than:
                return str(client["id"])
        assert time.monotonic() < deadline, "the hub has no pub/sub connection"
        await asyncio.sleep(0.02)


async def _kill_hub_connection(admin: aioredis.Redis) -> str:
    victim = await _hub_connection_id(admin)
    await admin.execute_command("CLIENT", "KILL", "ID", victim)
    return victim


@pytest.mark.timeout(60)
async def test_a_live_reader_loses_no_token_when_the_hub_connection_drops(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens published while the hub reconnects are re-read from the stream, in order."""
    monkeypatch.setattr(hub_module, "QUIET_SECONDS", 3600)  # no rescue by the quiet sweep
    job_id = str(uuid.uuid4())
    admin, publish = _publisher(databases, job_id)
    texts = [f" t{i}" for i in range(60)]
    async with running_hub(databases) as (_redis, hub, link):
        reader = JobEvents(link, hub, None, uuid.UUID(job_id), None)  # type: ignore[arg-type]
        batches = reader.batches()
        await publish([Event.of(StatusData(status=JobStatus.running))])
        received = list(await anext(batches))
        consumer = asyncio.ensure_future(_collect(batches, received))
        for i, text in enumerate(texts):
            if i in (15, 40):
                killed = await _kill_hub_connection(admin)
            await publish([Event.of(TokenData(text=text))])
            if i not in range(15, 20) and i not in range(40, 45):  # a burst right after a kill
                await asyncio.sleep(0.01)
        end = _succeeded(output_tokens=len(texts))
        await publish(end)
        async with asyncio.timeout(20):
            await consumer
        assert await _hub_connection_id(admin, other_than=killed)
    await admin.aclose()
    tokens = [e.parse(TokenData).text for e in received if e.type is EventType.token]
    assert tokens == texts
    assert received[-1].type is EventType.done
    assert hub.listeners == 0


async def _collect(batches: AsyncIterator[list[Event]], into: list[Event]) -> None:
    async for batch in batches:
        into.extend(batch)


async def _read_to_end(reader: JobEvents, within_s: float = 10) -> list[Event]:
    """The reader's live events up to its job's end (within `within_s`); the reader closed."""
    events: list[Event] = []
    async with asyncio.timeout(within_s):
        while not reader.ended:
            events += await reader.next()
    await reader.close()
    return events


@pytest.mark.timeout(60)
async def test_no_subscription_is_left_behind_across_reconnects(databases: Databases) -> None:
    """Readers come and go while the connection drops: no channel stays subscribed."""
    admin = aioredis.Redis.from_url(databases.redis_url, decode_responses=True)
    jobs = [str(uuid.uuid4()) for _ in range(12)]
    async with running_hub(databases) as (_, hub, _link):
        async with contextlib.AsyncExitStack() as readers:
            for job_id in jobs[:6]:
                await readers.enter_async_context(hub.subscribe(job_id))
            killed = await _kill_hub_connection(admin)
            await _hub_connection_id(admin, other_than=killed)
            # More readers while the new connection settles, then one more drop mid-way.
            joining = [asyncio.ensure_future(_visit(hub, job_id)) for job_id in jobs[6:]]
            killed = await _kill_hub_connection(admin)
            await asyncio.gather(*joining, return_exceptions=True)
        # Everyone has left; a drop right after, with the unsubscribes under way.
        await _kill_hub_connection(admin)
        await _until_unsubscribed(admin, hub, jobs)
        await asyncio.sleep(0.3)  # nothing comes back late
        await _until_unsubscribed(admin, hub, jobs)
    await admin.aclose()


async def _visit(hub: Hub, job_id: str) -> None:
    async with hub.subscribe(job_id):
        await asyncio.sleep(0.05)


async def _until_unsubscribed(admin: aioredis.Redis, hub: Hub, jobs: list[str]) -> None:
    deadline = time.monotonic() + 10
    while True:
        counts = dict(await admin.pubsub_numsub(*(channel(j) for j in jobs)))
        if not any(counts.values()) and hub.channels == 0 and hub.listeners == 0:
            return
        assert time.monotonic() < deadline, (counts, hub.channels, hub.listeners)
        await asyncio.sleep(0.05)


class RedisGate:
    """A TCP relay in front of the real Redis, to take Redis away and bring it back."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.port = free_port()
        self.url = urlunsplit(parts._replace(netloc=f"127.0.0.1:{self.port}"))
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._frozen: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def close(self) -> None:
        """Refuse new connections and cut the open ones: Redis is down, as far as anyone sees."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    def freeze(self) -> None:
        """The open connections go silent both ways without closing (a host cut off);
        new ones relay as before."""
        self._frozen |= self._writers

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}
        # Cancelled when the test's loop ends with a relay still open: nothing to report.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            while data := await reader.read(65536):
                if writer in self._frozen:
                    continue  # swallowed
                writer.write(data)
                await writer.drain()
        writer.close()


@pytest.mark.timeout(60)
async def test_the_hub_starts_with_redis_down_and_readers_wait_for_it(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis down at start: no crash; a reader that subscribes meanwhile goes on once it is
    back, and one that waits past the bound fails cleanly instead of hanging."""
    monkeypatch.setattr(hub_module, "RETRY_MAX_SECONDS", 0.2)
    gate = RedisGate(databases.redis_url)
    job_id = str(uuid.uuid4())
    admin, publish = _publisher(databases, job_id)
    async with running_hub(databases, url=gate.url, subscribe_timeout=1.0) as (_, hub, link):
        with pytest.raises(HubUnavailable):
            async with hub.subscribe(job_id):
                pytest.fail("subscribed while Redis is unreachable")
        assert hub.listeners == 0
        await publish([Event.of(StatusData(status=JobStatus.running))])
        reader = JobEvents(link, hub, None, uuid.UUID(job_id), None)  # type: ignore[arg-type]
        started = asyncio.ensure_future(reader.start())
        await asyncio.sleep(0.3)
        assert not started.done()
        await gate.open()
        async with asyncio.timeout(5):
            assert [e.type for e in await started] == [EventType.status]
        await publish([Event.of(TokenData(text="back"))])
        async with asyncio.timeout(5):
            assert [json.loads(e.data) for e in await reader.next()] == [{"text": "back"}]
        # Down again mid-stream: a second reader's subscribe fails within its bound...
        await gate.close()
        with pytest.raises(HubUnavailable):
            async with hub.subscribe(str(uuid.uuid4())):
                pytest.fail("subscribed while Redis is unreachable")
        await publish([Event.of(TokenData(text=" lost"))])
        # ...and once Redis is back the first reader gets what it missed from the stream.
        await gate.open()
        await publish(_succeeded())
        rest = await _read_to_end(reader)
        await gate.close()
    await admin.aclose()
    assert [e.type for e in rest] == [EventType.token, EventType.status, EventType.done]
    assert json.loads(rest[0].data) == {"text": " lost"}


@pytest.mark.timeout(60)
async def test_readers_subscribing_just_as_the_connection_is_killed_do_not_hang(
    databases: Databases,
) -> None:
    job_id = str(uuid.uuid4())
    admin, publish = _publisher(databases, job_id)
    await publish([Event.of(StatusData(status=JobStatus.running))])
    async with running_hub(databases) as (_redis, hub, link):
        await _kill_hub_connection(admin)  # the hub has not noticed yet
        readers = [JobEvents(link, hub, None, uuid.UUID(job_id), None) for _ in range(3)]  # type: ignore[arg-type]
        async with asyncio.timeout(15):
            for reader in readers:
                assert [e.type for e in await reader.start()] == [EventType.status]
        await publish(_succeeded())
        async with asyncio.timeout(15):
            for reader in readers:
                while not reader.ended:
                    await reader.next()
                await reader.close()
    await admin.aclose()
    assert hub.listeners == 0


@pytest.mark.timeout(60)
async def test_a_hub_connection_gone_silent_is_replaced_and_its_readers_catch_up(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that stops answering without closing (a host cut off) is asked a PING,
    failed when it goes unanswered, and replaced; its readers re-read what they missed."""
    monkeypatch.setattr(hub_module, "QUIET_SECONDS", 0.1)
    monkeypatch.setattr(hub_module, "IDLE_SECONDS", 0.3)
    monkeypatch.setattr(resp, "REPLY_TIMEOUT_S", 0.5)
    gate = RedisGate(databases.redis_url)
    await gate.open()
    job_id = str(uuid.uuid4())
    admin, publish = _publisher(databases, job_id)
    async with running_hub(databases, url=gate.url) as (_, hub, link):
        await publish([Event.of(StatusData(status=JobStatus.running))])
        reader = JobEvents(link, hub, None, uuid.UUID(job_id), None)  # type: ignore[arg-type]
        assert [e.type for e in await reader.start()] == [EventType.status]
        silent = await _hub_connection_id(admin)
        gate.freeze()
        await publish([Event.of(TokenData(text="unheard"))])
        await publish(_succeeded(output_tokens=1))
        rest = await _read_to_end(reader, 15)
        assert await _hub_connection_id(admin, other_than=silent)
        await gate.close()
    await admin.aclose()
    assert [e.type for e in rest] == [EventType.token, EventType.status, EventType.done]


@pytest.mark.timeout(120)
async def test_a_reader_who_comes_as_the_last_one_leaves_misses_nothing(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last reader's leaving sends an UNSUBSCRIBE; a reader who comes before Redis has
    confirmed it must wait for the SUBSCRIBE after it before reading the stream, or what is
    published between the two is neither in its replay nor heard live."""
    monkeypatch.setattr(hub_module, "QUIET_SECONDS", 3600)  # no rescue by the quiet sweep
    async with running_hub(databases) as (_redis, hub, link):
        for _ in range(10):
            job_id = str(uuid.uuid4())
            admin, publish = _publisher(databases, job_id)
            await publish([Event.of(StatusData(status=JobStatus.running))])
            texts = [f" t{i}" for i in range(200)]

            async def flushes(texts: list[str] = texts, publish: Any = publish) -> None:
                for text in texts:  # a worker's flushes, on and on
                    await publish([Event.of(TokenData(text=text))])
                await publish(_succeeded(output_tokens=len(texts)))

            async with hub.subscribe(job_id):
                writing = asyncio.ensure_future(flushes())
                await asyncio.sleep(0.005)
            hub._drop_idle()  # as the quiet sweep does after the last reader left
            # The UNSUBSCRIBE is on its way, and another reader comes at once.
            reader = JobEvents(link, hub, None, uuid.UUID(job_id), None)  # type: ignore[arg-type]
            received = list(await reader.start())
            received += await _read_to_end(reader)
            await writing
            await admin.aclose()
            tokens = [e.parse(TokenData).text for e in received if e.type is EventType.token]
            assert tokens == texts


@pytest.mark.timeout(60)
async def test_an_unreadable_message_sends_its_readers_to_the_stream_and_keeps_the_connection(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message this process cannot read (a newer worker's event type, say) is logged and
    its channel's readers read the stream; nobody else loses the shared connection."""
    monkeypatch.setattr(hub_module, "QUIET_SECONDS", 3600)
    job_id = str(uuid.uuid4())
    admin, publish = _publisher(databases, job_id)
    async with running_hub(databases) as (_redis, hub, link):
        await publish([Event.of(StatusData(status=JobStatus.running))])
        reader = JobEvents(link, hub, None, uuid.UUID(job_id), None)  # type: ignore[arg-type]
        assert [e.type for e in await reader.start()] == [EventType.status]
        before = await _hub_connection_id(admin)
        await admin.publish(channel(job_id), "1-0\nfrom-the-future\n{}")
        await publish([Event.of(TokenData(text="after"))])
        await publish(_succeeded(output_tokens=1))
        rest = await _read_to_end(reader)
        assert await _hub_connection_id(admin) == before
    await admin.aclose()
    assert [e.type for e in rest] == [EventType.token, EventType.status, EventType.done]


@pytest.mark.timeout(60)
async def test_a_refused_pub_sub_command_makes_the_hub_start_over_on_a_new_connection(
    databases: Databases,
) -> None:
    """An error reply on the subscribed connection (an ACL denying a channel, say) means the
    hub's bookkeeping no longer holds: it drops the connection and subscribes anew."""
    job_id = str(uuid.uuid4())
    admin, publish = _publisher(databases, job_id)
    async with running_hub(databases) as (_redis, hub, link):
        await publish([Event.of(StatusData(status=JobStatus.running))])
        reader = JobEvents(link, hub, None, uuid.UUID(job_id), None)  # type: ignore[arg-type]
        await reader.start()
        before = await _hub_connection_id(admin)
        hub._on_push(redis.exceptions.ResponseError("NOPERM this user has no permissions"))
        assert await _hub_connection_id(admin, other_than=before)
        await publish(_succeeded(output_tokens=0))
        rest = await _read_to_end(reader)
    await admin.aclose()
    assert [e.type for e in rest][-2:] == [EventType.status, EventType.done]


@pytest.mark.timeout(60)
async def test_a_channel_left_idle_stays_subscribed_until_the_next_sweep(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader who comes back right after the last one left finds the channel subscribed
    (no new round trip); the quiet sweep unsubscribes what stays idle."""
    monkeypatch.setattr(hub_module, "QUIET_SECONDS", 0.5)
    admin = aioredis.Redis.from_url(databases.redis_url, decode_responses=True)
    jobs = [str(uuid.uuid4()) for _ in range(3)]
    async with running_hub(databases) as (_, hub, _link):
        async with contextlib.AsyncExitStack() as readers:
            for job_id in jobs:
                await readers.enter_async_context(hub.subscribe(job_id))
        counts = dict(await admin.pubsub_numsub(*(channel(j) for j in jobs)))
        assert all(counts.values()), counts  # still subscribed, though nobody listens
        assert hub._channels[channel(jobs[0])].ready.is_set()  # nothing to wait for
        async with asyncio.timeout(1):
            async with hub.subscribe(jobs[0]):
                assert hub.listeners == 1
        await _until_unsubscribed(admin, hub, jobs)
    await admin.aclose()
