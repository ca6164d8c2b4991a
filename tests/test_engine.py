"""The worker's stream loop (workers/engine.py) with real publishers on a real Redis: every
token written once and in order, the first at once, the rest together; a cancel, a lost claim
and a Redis that lost its scripts, as the generation's thread sees them."""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import pytest
import redis
from huggingface_hub import InferenceClient

from inferq.events import (
    PUBLISH_SCRIPT,
    Event,
    EventType,
    cancel_key,
    claim_key,
    from_entries,
    script_keys,
    stream_key,
)
from inferq.lifecycle import Claim
from inferq.models import JobStatus
from inferq.protocol import JobInput, JobParams, StatusData, TokenData
from tests.servers import Databases, redis_client, start_sim
from tests.test_metrics import eventually
from workers.backends.base import GenerationRequest
from workers.backends.tgi import TextGenerationStream
from workers.engine import StreamEngine
from workers.publisher import ClaimLost, FlushPace, TokenPublisher


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """20 ms between tokens."""
    url, child = start_sim(tmp_path_factory.mktemp("engine"), "20")
    yield url
    child.stop()


@pytest.fixture
def client(databases: Databases) -> Iterator[redis.Redis]:
    """A Redis client; the keys of the jobs made with `_job` are deleted after the test."""
    client = redis_client(databases.redis_url)
    made.clear()
    yield client
    client.delete(*(key for job_id in made for key in script_keys(job_id)))
    client.close()


made: list[str] = []  # the test's jobs


@pytest.fixture
def engine(databases: Databases) -> Iterator[StreamEngine]:
    # A flush every 100 ms: about five tokens of the simulator's each.
    engine = StreamEngine(
        databases.redis_url, FlushPace(base_s=0.1, budget=400, max_s=0.1), flush_max_tokens=16
    )
    engine.start()
    yield engine
    engine.stop()


class _Sink:
    def __init__(self, publisher: TokenPublisher, max_tokens: int) -> None:
        self.publisher = publisher
        self.max_tokens = max_tokens
        self.deltas: list[str] = []

    def ending(self) -> None:
        return None  # the job's end is the caller's

    def took(self, deltas: list[str], now: float) -> None:
        self.deltas += deltas
        self.publisher.extend(deltas)


def _job(client: redis.Redis, max_tokens: int) -> tuple[str, TokenPublisher]:
    job_id = str(uuid.uuid4())
    made.append(job_id)
    request = JobInput(prompt="-"), JobParams(max_tokens=max_tokens)
    claim = Claim(uuid.uuid4(), uuid.uuid4(), 1, "sim", *request, dt.datetime.now(dt.UTC), None)
    publisher = TokenPublisher(
        client.register_script(PUBLISH_SCRIPT),
        job_id,
        maxlen=1000,
        ttl=60,
        pace=FlushPace(base_s=0.05, budget=400, max_s=0.05),
        flush_max_tokens=16,
        claim=claim,
    )
    return job_id, publisher


def _stream(url: str, max_tokens: int, seed: int) -> tuple[TextGenerationStream, Any]:
    request = GenerationRequest(prompt="tell me", messages=None, max_tokens=max_tokens, seed=seed)
    stream = TextGenerationStream(InferenceClient(model=url, api_key="-", timeout=30), request)
    lean = stream.lean_request()
    assert lean is not None
    return stream, lean


def _tokens(client: redis.Redis, job_id: str) -> list[TokenData]:
    events = from_entries(client.xrange(stream_key(job_id)))
    return [event.parse(TokenData) for event in events if event.type is EventType.token]


def test_every_token_of_many_streams_is_written_once_in_order_the_first_at_once(
    engine: StreamEngine, client: redis.Redis, sim_url: str
) -> None:
    jobs = [_job(client, 40) for _ in range(8)]
    sinks = [_Sink(publisher, 40) for _, publisher in jobs]
    relays = []
    for seed, sink in enumerate(sinks):
        stream, request = _stream(sim_url, 40, seed)
        relays.append((stream, engine.relay(stream, request, 30, sink)))
    for stream, relay in relays:
        assert relay.wait() is False
        stream.ended()  # the stream said it finished
    for (job_id, publisher), sink in zip(jobs, sinks, strict=True):
        publisher.send([], final=True)  # what was pending at the end: the thread's
        written = _tokens(client, job_id)
        assert "".join(t.text for t in written) == "".join(sink.deltas)
        assert sum(t.count for t in written) == len(sink.deltas) > 10
        assert written[0].count == 1  # the first token went alone, at once
        assert len(written) <= len(sink.deltas) / 2  # the rest went together


class _Ticks(_Sink):
    """A sink that keeps, for each read, which of the loop's flush ticks was next."""

    def __init__(self, publisher: TokenPublisher, max_tokens: int, engine: StreamEngine) -> None:
        super().__init__(publisher, max_tokens)
        self.engine = engine
        self.reads: list[tuple[int, float]] = []  # (deltas, the next tick)

    def took(self, deltas: list[str], now: float) -> None:
        self.reads.append((len(deltas), self.engine.next_tick))
        super().took(deltas, now)


def test_a_stream_whose_end_comes_before_the_tick_is_not_held_until_the_tick(
    databases: Databases, client: redis.Redis, tmp_path: Any
) -> None:
    """A read's tokens are paced together: a stream that learns at a tick that its end comes
    before the next one pauses only until its end is due, and ends before the next tick."""
    url, sim = start_sim(tmp_path, "20", "1", "--fixed-output-tokens", "40")
    # A tick every 0.6 s: the first comes some 30 tokens into the 40 (a token every 20 ms,
    # 0.8 s in all); buffers large enough that only the pace decides.
    engine = StreamEngine(
        databases.redis_url, FlushPace(base_s=0.6, budget=400, max_s=0.6), flush_max_tokens=64
    )
    engine.start()
    try:
        _, publisher = _job(client, 40)
        sink = _Ticks(publisher, 40, engine)
        stream, request = _stream(url, 40, 7)
        assert engine.relay(stream, request, 30, sink).wait() is False
        stream.ended()
    finally:
        engine.stop()
        sim.stop()
    assert sum(count for count, _ in sink.reads) == 40
    ticks = list(dict.fromkeys(tick for _, tick in sink.reads))
    # Before the first tick: the first token, then a pause; at the tick, what came meanwhile
    # in one read; then the rest near its end, in a few reads (not one a token), all before
    # the second tick.
    assert len(ticks) == 2
    at_the_tick = [count for count, tick in sink.reads if tick == ticks[1]]
    assert at_the_tick[0] > 15
    assert 1 <= len(at_the_tick[1:]) <= 4 and sum(at_the_tick[1:]) > 5


def test_a_cancel_seen_by_a_flush_ends_the_stream_and_closes_it(
    engine: StreamEngine, client: redis.Redis, sim_url: str
) -> None:
    job_id, publisher = _job(client, 500)
    stream, request = _stream(sim_url, 500, 1)  # 10 s of tokens
    sink = _Sink(publisher, 500)
    relay = engine.relay(stream, request, 30, sink)
    threading.Timer(0.5, lambda: client.set(cancel_key(job_id), "1", ex=60)).start()
    started = time.monotonic()
    assert relay.wait() is True
    assert time.monotonic() - started < 3
    assert publisher.cancelled
    # The connection is closed: the simulator stops generating (its slot is free).
    eventually(
        lambda: httpx.get(f"{sim_url}/sim/state").json()["active"] == 0, "the backend's slot freed"
    )
    # Everything read before the flag was seen is written or still pending for the thread's
    # closing write: nothing is lost, nothing is written twice.
    publisher.send([], final=True)
    assert "".join(t.text for t in _tokens(client, job_id)) == "".join(sink.deltas)


def test_a_write_refused_by_a_newer_claim_ends_the_stream_with_the_claim_lost(
    engine: StreamEngine, client: redis.Redis, sim_url: str
) -> None:
    job_id, publisher = _job(client, 500)
    client.set(claim_key(job_id), f"9:{uuid.uuid4()}", ex=60)  # a later attempt took over
    stream, request = _stream(sim_url, 500, 2)
    with pytest.raises(ClaimLost):
        engine.relay(stream, request, 30, _Sink(publisher, 500)).wait()
    assert client.xlen(stream_key(job_id)) == 0


def test_the_loop_loads_the_script_again_when_redis_lost_it(
    engine: StreamEngine, client: redis.Redis, sim_url: str
) -> None:
    job_id, publisher = _job(client, 10)
    marks = f"inferq:test-marks:{job_id}"
    client.zadd(marks, {job_id: 1.0, "another": 2.0})
    publisher.lead(_running(), also=lambda pipe: pipe.zrem(marks, job_id))
    stream, request = _stream(sim_url, 10, 3)
    sink = _Sink(publisher, 10)
    client.script_flush()
    assert engine.relay(stream, request, 30, sink).wait() is False
    publisher.send([], final=True)
    assert "".join(t.text for t in _tokens(client, job_id)) == "".join(sink.deltas)
    assert _types(client, job_id)[:2] == [EventType.status, EventType.token]
    assert client.zrange(marks, 0, -1) == ["another"]
    client.delete(marks)


def test_a_jobs_start_leads_its_streams_first_write_with_its_commands(
    engine: StreamEngine, client: redis.Redis, sim_url: str
) -> None:
    """The `status` the thread leaves to the loop goes first, once, in the loop's round trip
    with its commands; a stream that fails before the loop wrote it leaves it to the thread's
    next write, still first and once."""
    job_id, publisher = _job(client, 20)
    counter = f"inferq:test-starts:{job_id}"
    publisher.lead(_running(), also=lambda pipe: pipe.incr(counter))
    stream, request = _stream(sim_url, 20, 4)
    sink = _Sink(publisher, 20)
    assert engine.relay(stream, request, 30, sink).wait() is False
    assert not publisher.leading
    publisher.send([], final=True)
    types = _types(client, job_id)
    assert types[0] is EventType.status and types.count(EventType.status) == 1
    assert set(types[1:]) == {EventType.token}
    assert "".join(t.text for t in _tokens(client, job_id)) == "".join(sink.deltas)
    assert client.get(counter) == "1"
    # A backend that refuses the connection: the stream ends at once, its start written once.
    failed_id, failing = _job(client, 20)
    failing.lead(_running(), also=lambda pipe: pipe.incr(counter))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    stream, request = _stream(f"http://127.0.0.1:{port}", 20, 5)
    with pytest.raises(httpx2.ConnectError):  # as the lean reader raises it
        engine.relay(stream, request, 30, _Sink(failing, 20)).wait()
    failing.send([], final=True)  # the thread's closing write
    assert _types(client, failed_id) == [EventType.status]
    assert client.get(counter) == "2"
    client.delete(counter)


def _running() -> list[Event]:
    return [Event.of(StatusData(status=JobStatus.running))]


def _types(client: redis.Redis, job_id: str) -> list[EventType]:
    return [event.type for event in from_entries(client.xrange(stream_key(job_id)))]
