"""Stopping jobs early and on time: cancel while blocked, deadlines, a worker's graceful exit."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
from huggingface_hub import InferenceClient
from redis import exceptions as redis_errors
from sqlalchemy import Engine, text

from inferq import lifecycle
from inferq.db import make_async_engine, make_sync_engine
from inferq.events import PUBLISH_SCRIPT, stream_key
from inferq.models import JobStatus
from inferq.queue import ENQUEUED_KEY
from tests.conftest import Platform, Sim, submit, wait_for
from tests.servers import Child, redis_client
from tests.sse import Transcript, read
from workers.backends.base import GenerationRequest
from workers.backends.tgi import TextGenerationStream
from workers.engine import LoopEnd, StreamEngine
from workers.publisher import FlushPace, TokenPublisher


@pytest.fixture
def engine(platform: Platform) -> Iterator[Engine]:
    engine = make_sync_engine(platform.database_url, pool_size=2)
    yield engine
    engine.dispose()


def _sql(platform: Platform, statement: str, *params: object) -> None:
    with psycopg.connect(platform.database_url, autocommit=True) as db:
        db.execute(statement, params)  # type: ignore[arg-type]


def _backend_alive(platform: Platform, pid: object) -> bool:
    with psycopg.connect(platform.database_url, autocommit=True) as db:
        row = db.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return bool(row and row[0])


def _wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def _stall_next_request(sim: Sim, seconds: float) -> None:
    body = {"mode": "stall", "count": 1, "stall_ms": seconds * 1000}
    httpx.post(f"{sim.url}/sim/faults", json=body, timeout=5).raise_for_status()


# Cancel -------------------------------------------------------------------------------------


def test_cancel_during_prefill_ends_at_once_and_frees_the_slot(
    platform: Platform, http: httpx.Client
) -> None:
    sim = platform.sims["faulty"]
    _wait_until(lambda: sim.state()["active"] == 0)
    cancelled_before = sim.state()["cancelled"]
    _stall_next_request(sim, 60)  # no token for a minute: the worker sits in a blocked read
    try:
        job = submit(http, model="faulty", prompt="a very slow first token", max_tokens=20)
        _wait_until(lambda: sim.state()["active"] == 1)
        asked = time.monotonic()
        http.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
        stored = wait_for(http, job["id"], timeout=15)
        took = time.monotonic() - asked
    finally:
        sim.clear_faults()
    assert stored["status"] == "cancelled"
    assert stored["finish_reason"] == "cancelled"
    assert stored["output"] == ""
    assert took < 15  # a minute before the first token would come
    _wait_until(lambda: sim.state()["active"] == 0, timeout=5)
    assert sim.state()["cancelled"] > cancelled_before
    transcript = read(http, job["id"], Transcript())
    assert transcript.of_type("done")[-1]["status"] == "cancelled"


def test_cancel_during_a_retry_back_off_ends_at_once(
    platform: Platform, http: httpx.Client
) -> None:
    sim = platform.sims["slow"]
    # A long back-off: the capped wait between backend tries is then about ten seconds.
    worker = platform.worker("patient", "lonely", INFERQ_BACKEND_RETRY_BASE_SECONDS="60")
    try:
        requests = sim.state()["total_requests"]
        sim.fault("overloaded", count=2)
        job = submit(http, model="lonely", prompt="waits out an overload", max_tokens=5)
        _wait_until(lambda: sim.state()["total_requests"] > requests, timeout=60)
        time.sleep(0.3)  # the worker is now asleep before its next try
        http.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
        stored = wait_for(http, job["id"], timeout=6)
    finally:
        sim.clear_faults()
        worker.stop()
    assert stored["status"] == "cancelled"
    assert sim.state()["total_requests"] == requests + 1  # no further try was made


# Deadlines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0, -1, 7 * 86400 + 1, "soon"])
def test_deadline_seconds_must_be_positive_and_bounded(http: httpx.Client, seconds: object) -> None:
    response = http.post(
        "/v1/jobs", json={"model": "parked", "prompt": "x", "deadline_seconds": seconds}
    )
    assert response.status_code == 422


def test_a_job_not_started_by_its_deadline_expires(http: httpx.Client) -> None:
    job = submit(
        http, model="parked", prompt="nobody serves this", max_tokens=2, deadline_seconds=1
    )
    created = datetime.fromisoformat(job["created_at"])
    deadline = datetime.fromisoformat(job["deadline_at"])
    assert timedelta(seconds=0.5) < deadline - created < timedelta(seconds=1.5)
    stored = wait_for(http, job["id"], timeout=20)
    assert stored["status"] == "expired"
    assert stored["error"]["type"] == "deadline_exceeded"
    assert stored["started_at"] is None
    transcript = read(http, job["id"], Transcript())
    assert transcript.events[-1].event == "error"
    assert transcript.of_type("error")[-1]["type"] == "deadline_exceeded"
    assert transcript.of_type("status")[-1]["status"] == "expired"


def test_a_claim_refuses_an_overdue_job_and_expires_it(
    platform: Platform, http: httpx.Client, engine: Engine
) -> None:
    job = submit(http, model="parked", prompt="too late", max_tokens=2, deadline_seconds=3600)
    job_id = uuid.UUID(job["id"])
    # One transaction, so that the sweeper cannot expire the job first.
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET deadline_at = now() - interval '1 second' WHERE id = :id"),
            {"id": job_id},
        )
        assert lifecycle.claim(conn, job_id, "w", 30, 3) is None
        assert lifecycle.expire(conn, job_id) == "parked"
        assert lifecycle.expire(conn, job_id) is None  # once
    stored = http.get(f"/v1/jobs/{job['id']}").json()
    assert stored["status"] == "expired"
    assert stored["error"]["type"] == "deadline_exceeded"
    assert stored["attempts"] == 0


def test_a_rerun_keeps_the_first_start(
    platform: Platform, http: httpx.Client, engine: Engine
) -> None:
    job = submit(http, model="parked", prompt="run twice", max_tokens=2)
    job_id = uuid.UUID(job["id"])
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        first = lifecycle.claim(conn, job_id, "w1", 30, 3)
        assert first is not None and first.started_at is not None
        _sql(
            platform,
            "UPDATE jobs SET lease_expires_at = now() - interval '1 s' WHERE id = %s",
            job["id"],
        )
        second = lifecycle.claim(conn, job_id, "w2", 30, 3)
    assert second is not None and second.attempt == 2
    assert second.started_at == first.started_at


def _succeeded(first_token_at: datetime) -> lifecycle.Outcome:
    """A job that streamed "abc": 4 tokens in, 3 out, a quarter of a dollar."""
    return lifecycle.Outcome(
        JobStatus.succeeded,
        output="abc",
        finish_reason="length",
        input_tokens=4,
        output_tokens=3,
        cost_usd=0.25,
        first_token_at=first_token_at,
    )


def test_the_workers_direct_claim_and_finish_match_the_core_statements(
    platform: Platform, http: httpx.Client, engine: Engine
) -> None:
    """The claim and the finish a worker runs on the driver's connection: the same rows and
    the same refusals as the Core statements, and a connection that Postgres closed is
    replaced before the next statement, without an error."""
    direct = lifecycle.Direct(engine)
    job = submit(http, model="parked", prompt="claimed directly", max_tokens=3, seed=11)
    job_id = uuid.UUID(job["id"])
    claim = direct.claim(job_id, "w1", 30, 3)
    assert claim is not None and claim.attempt == 1 and claim.model == "parked"
    assert claim.input.prompt == "claimed directly" and claim.params.max_tokens == 3
    assert claim.params.seed == 11 and claim.started_at is not None and not claim.limited
    assert direct.claim(job_id, "w2", 30, 3) is None  # leased
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        assert lifecycle.claim(conn, job_id, "w2", 30, 3) is None
    # Postgres ends the pool's connection (there is one: each statement returned it): the
    # next checkout finds its socket closed and opens another before the statement is sent.
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        conn.rollback()
    _sql(platform, "SELECT pg_terminate_backend(%s)", pid)
    _wait_until(lambda: not _backend_alive(platform, pid))
    stranger = replace(claim, token=uuid.uuid4())
    done = _succeeded(datetime.now(UTC))
    assert not direct.finish(stranger, done)  # another worker's claim
    assert direct.finish(claim, done)
    assert not direct.finish(claim, done)  # once
    stored = http.get(f"/v1/jobs/{job['id']}").json()
    assert stored["status"] == "succeeded" and stored["output"] == "abc"
    assert stored["usage"] == {"input_tokens": 4, "output_tokens": 3, "cost_usd": 0.25}
    assert stored["finish_reason"] == "length"
    with engine.connect() as conn:  # the pool's connection is back out of autocommit
        assert conn.connection.driver_connection.autocommit is False
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
        conn.rollback()


_ENDED = (
    "status, output, finish_reason, input_tokens, output_tokens, cost_usd, error_type,"
    " error_message, first_token_at, input = '{}'::jsonb, redacted_at IS NOT NULL,"
    " lease_expires_at,"
    " finished_at IS NOT NULL"
)


def test_the_loops_finishes_asked_together_go_in_one_statement_as_each_alone_would(
    platform: Platform, http: httpx.Client, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finishes a stream loop asks in one turn: one statement for all of them, each job
    ended as the statement for one ends it (a success, a failure, a redacted input, a claim
    of another worker's that is refused), and the answer for each its own."""
    direct = lifecycle.Direct(engine)
    first = datetime.now(UTC) - timedelta(seconds=1)
    outcomes = [
        _succeeded(first),
        lifecycle.Outcome(JobStatus.failed, error_type="backend_error", error_message="broke"),
        lifecycle.Outcome(JobStatus.succeeded, output="", finish_reason="stop", output_tokens=0),
    ]

    def claimed(prompt: str, redact: bool) -> lifecycle.Claim:
        job = submit(http, model="parked", prompt=prompt, max_tokens=3, seed=11)
        if redact:
            _sql(
                platform,
                "UPDATE jobs SET params = params || %s::jsonb WHERE id = %s",
                json.dumps({lifecycle.REDACT_PARAM: True}),
                job["id"],
            )
        claim = direct.claim(uuid.UUID(job["id"]), "w1", 30, 3)
        assert claim is not None
        return claim

    alone = [claimed(f"alone {i}", redact=i == 2) for i in range(3)]
    together = [claimed(f"together {i}", redact=i == 2) for i in range(3)]
    taken = claimed("taken", redact=False)
    sent: list[int] = []
    run = lifecycle.LoopFinish._run

    async def counted(self: lifecycle.LoopFinish, asked: list[Any]) -> None:
        sent.append(len(asked))
        await run(self, asked)

    monkeypatch.setattr(lifecycle.LoopFinish, "_run", counted)

    async def finish_all() -> tuple[list[bool], list[bool]]:
        finishes = lifecycle.LoopFinish(platform.database_url, 2)
        try:
            each = [await finishes.finish(c, o) for c, o in zip(alone, outcomes, strict=True)]
            stranger = replace(taken, token=uuid.uuid4())
            asked = [finishes.finish(c, o) for c, o in zip(together, outcomes, strict=True)]
            both = await asyncio.gather(*asked, finishes.finish(stranger, outcomes[0]))
            return each, list(both)
        finally:
            await finishes.close()

    each, both = asyncio.run(finish_all())
    assert each == [True, True, True] and both == [True, True, True, False]
    assert sent == [1, 1, 1, 4]

    def ended(claim: lifecycle.Claim) -> tuple[Any, ...]:
        with psycopg.connect(platform.database_url, autocommit=True) as db:
            row = db.execute(f"SELECT {_ENDED} FROM jobs WHERE id = %s", [claim.job_id])
            found = row.fetchone()
        assert found is not None
        return tuple(found)

    for one, other in zip(alone, together, strict=True):
        assert ended(one) == ended(other)
    assert ended(alone[0])[:9] == (
        "succeeded",
        "abc",
        "length",
        4,
        3,
        Decimal("0.25"),
        None,
        None,
        first,
    )
    assert ended(alone[1])[0] == "failed" and ended(alone[1])[6:8] == ("backend_error", "broke")
    assert ended(alone[2])[9:11] == (True, True)  # the redacted input, gone with the end
    assert ended(alone[0])[9:11] == (False, False)
    assert ended(taken)[0] == "running"  # another worker's claim: untouched


async def test_the_apis_pool_replaces_a_connection_postgres_closed_without_a_ping(
    platform: Platform,
) -> None:
    """The API's engine hands out no connection the server has closed, and checks none with
    a query of its own: a checkout sends nothing to Postgres."""
    engine = make_async_engine(platform.database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
            raw = await conn.get_raw_connection()
            asyncpg_conn = raw.driver_connection
            await conn.rollback()
        # The pooled connection, idle: a checkout runs no statement on it.
        queries: list[str] = []
        asyncpg_conn.add_query_logger(lambda record: queries.append(record.query))
        async with engine.connect() as conn:
            await conn.get_raw_connection()
        assert queries == []
        closed = asyncio.Event()
        asyncpg_conn.add_termination_listener(lambda _conn: closed.set())
        _sql(platform, "SELECT pg_terminate_backend(%s)", pid)
        await asyncio.to_thread(_wait_until, lambda: not _backend_alive(platform, pid))
        async with asyncio.timeout(10):
            await closed.wait()  # the loop has read the goodbye
        assert asyncpg_conn.is_closed()
        async with engine.connect() as conn:  # no error: a fresh connection
            assert (await conn.execute(text("SELECT pg_backend_pid()"))).scalar() != pid
    finally:
        await engine.dispose()


def test_the_run_budget_spans_every_attempt(platform: Platform, http: httpx.Client) -> None:
    """A job re-run after its worker died keeps the budget counted from its first start."""
    job = submit(http, model="parked", prompt="started long ago", max_tokens=5)
    # As if a worker had started it on `sim` eleven minutes ago (the budget is ten) and died.
    _sql(
        platform,
        "UPDATE jobs SET model = 'sim', status = 'running', attempts = 1,"
        " started_at = now() - interval '11 minutes',"
        " lease_expires_at = now() - interval '1 minute' WHERE id = %s",
        job["id"],
    )
    redis_client(platform.redis_url).zrem(ENQUEUED_KEY, job["id"])  # its message went to `parked`
    stored = wait_for(http, job["id"], timeout=30)  # the sweeper re-enqueues it
    assert stored["status"] == "failed"
    assert stored["error"]["type"] == "deadline_exceeded"
    assert stored["attempts"] == 2


def test_a_job_whose_stored_params_are_invalid_fails_once(
    platform: Platform, http: httpx.Client
) -> None:
    job = submit(http, model="parked", prompt="no max_tokens stored", max_tokens=5)
    # As if the row had been written wrong: the worker cannot read its parameters.
    _sql(platform, "UPDATE jobs SET model = 'sim', params = '{}' WHERE id = %s", job["id"])
    redis_client(platform.redis_url).zrem(ENQUEUED_KEY, job["id"])  # its message went to `parked`
    stored = wait_for(http, job["id"], timeout=30)  # the sweeper re-enqueues it
    assert stored["status"] == "failed"
    assert stored["error"]["type"] == "backend_error"
    assert "stored request is invalid" in stored["error"]["message"]
    assert stored["attempts"] == 1


# Graceful shutdown --------------------------------------------------------------------------


def test_sigterm_hands_running_jobs_to_another_worker_after_the_grace(
    platform: Platform, http: httpx.Client
) -> None:
    env = {"INFERQ_SHUTDOWN_GRACE_SECONDS": "1", "INFERQ_LEASE_SECONDS": "300"}
    leaving = platform.worker("leaving", "lonely", **env)
    heir: Child | None = None
    transcript = Transcript()
    try:
        job = submit(http, model="lonely", prompt="outlive my worker", max_tokens=400, seed=9)
        reader = threading.Thread(target=read, args=(http, job["id"], transcript))
        reader.start()
        _wait_until(lambda: len(transcript.of_type("token")) >= 3, timeout=60)
        heir = platform.worker("heir-of-leaving", "lonely", **env)
        leaving.terminate()
        terminated = time.monotonic()
        leaving.popen.wait(timeout=60)
        exited = time.monotonic() - terminated
        stored = wait_for(http, job["id"], timeout=150)
        finished = time.monotonic() - terminated
        reader.join(timeout=30)
    finally:
        leaving.stop()
        if heir is not None:
            heir.stop()
    expected = platform.sims["slow"].generate("outlive my worker", 400, seed=9)
    assert stored["status"] == "succeeded"
    assert stored["output"] == expected["generated_text"]
    assert stored["attempts"] == 2
    assert transcript.of_type("reset"), "readers must be told the output restarts"
    assert transcript.output() == stored["output"]
    assert exited < 30  # the grace is one second
    assert finished < 150  # not after the five-minute lease


class _EndingSink:
    """A stream's sink whose job ends on the loop: its deltas, then `outcome` with them."""

    def __init__(
        self,
        publisher: TokenPublisher,
        claim: lifecycle.Claim,
        marks: str,
        before_end: Callable[[], object] | None = None,
    ) -> None:
        self.publisher = publisher
        self.max_tokens = claim.params.max_tokens
        self.claim = claim
        self.marks = marks
        self.before_end = before_end
        self.deltas: list[str] = []

    def took(self, deltas: list[str], now: float) -> None:
        self.deltas += deltas
        self.publisher.extend(deltas)

    def ending(self) -> LoopEnd:
        if self.before_end is not None:
            self.before_end()
        outcome = lifecycle.Outcome(
            JobStatus.succeeded,
            output="".join(self.deltas),
            finish_reason="length",
            input_tokens=2,
            output_tokens=len(self.deltas),
            cost_usd=0.5,
        )
        job_id, marks = str(self.claim.job_id), self.marks
        also = lambda pipe: pipe.sadd(marks, job_id)  # noqa: E731
        return LoopEnd(self.claim, outcome, also)


def _relayed_on_loop(
    platform: Platform,
    database_url: str,
    claim: lifecycle.Claim,
    marks: str,
    before_end: Callable[[], object] | None = None,
) -> tuple[bool | None, _EndingSink]:
    """The claimed job's stream (8 tokens of the fast simulator) on a stream loop that ends
    the jobs it can on `database_url`; whether the loop finished it, and the sink."""
    finishes = lifecycle.LoopFinish(database_url, 2)
    redis = redis_client(platform.redis_url)
    publisher = TokenPublisher(
        redis.register_script(PUBLISH_SCRIPT),
        str(claim.job_id),
        maxlen=1000,
        ttl=60,
        pace=FlushPace(0.02, 400, 0.1),
        flush_max_tokens=16,
        claim=claim,
    )
    loop = StreamEngine(platform.redis_url, FlushPace(0.02, 400, 0.1), finishes=finishes)
    loop.start()
    try:
        request = GenerationRequest(prompt="on the loop", messages=None, max_tokens=8, seed=3)
        client = InferenceClient(model=platform.sims["fast"].url, api_key="-", timeout=30)
        stream = TextGenerationStream(client, request)
        lean = stream.lean_request()
        assert lean is not None
        sink = _EndingSink(publisher, claim, marks, before_end)
        relay = loop.relay(stream, lean, 30, sink)
        try:
            assert relay.wait() is False
        except redis_errors.ResponseError:
            assert relay.finished  # the job ended, then its closing write failed
            raise
        return relay.finished, sink
    finally:
        loop.stop()
        redis.close()


def test_the_stream_loop_ends_a_job_that_streamed_well_and_leaves_the_rest_to_its_thread(
    platform: Platform, http: httpx.Client, engine: Engine
) -> None:
    """Its row finished under its claim, then its closing events after its last tokens with
    the caller's commands; a refused finish writes nothing; a Postgres it cannot reach leaves
    the end to the job's thread."""
    direct = lifecycle.Direct(engine)
    marks = f"inferq:test-ended:{uuid.uuid4()}"
    redis = redis_client(platform.redis_url)

    def claimed(prompt: str) -> lifecycle.Claim:
        job = submit(http, model="parked", prompt=prompt, max_tokens=8, seed=3)
        claim = direct.claim(uuid.UUID(job["id"]), "loop", 30, 3)
        assert claim is not None
        return claim

    def types(claim: lifecycle.Claim) -> list[str]:
        return [fields["e"] for _, fields in redis.xrange(stream_key(str(claim.job_id)))]

    try:
        claim = claimed("ended on the loop")
        finished, sink = _relayed_on_loop(platform, platform.database_url, claim, marks)
        assert finished is True
        stored = http.get(f"/v1/jobs/{claim.job_id}").json()
        assert stored["status"] == "succeeded" and stored["output"] == "".join(sink.deltas)
        assert stored["usage"]["output_tokens"] == len(sink.deltas) == 8
        assert types(claim)[-2:] == ["status", "done"]
        assert set(types(claim)[:-2]) == {"token"}
        events = [fields for _, fields in redis.xrange(stream_key(str(claim.job_id)))]
        assert "".join(_text(e) for e in events if e["e"] == "token") == stored["output"]
        assert redis.ttl(stream_key(str(claim.job_id))) > 0  # the closing write's
        assert redis.smembers(marks) == {str(claim.job_id)}

        # Another worker's claim: refused, and nothing closes the stream.
        taken = claimed("taken over")
        stranger = replace(taken, token=uuid.uuid4())
        finished, _ = _relayed_on_loop(platform, platform.database_url, stranger, marks)
        assert finished is False
        assert "done" not in types(stranger)
        assert http.get(f"/v1/jobs/{taken.job_id}").json()["status"] == "running"

        # A Postgres the loop cannot reach: the thread is left to finish.
        lost = claimed("left to the thread")
        unreachable = "postgresql://postgres@127.0.0.1:1/none"
        finished, _ = _relayed_on_loop(platform, unreachable, lost, marks)
        assert finished is None
        assert "done" not in types(lost)
        assert http.get(f"/v1/jobs/{lost.job_id}").json()["status"] == "running"

        # A closing write that Redis refuses (the stream's key taken by a value of another
        # type): the job has ended; the thread is told of the failure, not of a stream to
        # run again.
        spoilt = claimed("closing refused")
        key = stream_key(str(spoilt.job_id))

        def spoil() -> None:
            redis.delete(key)
            redis.set(key, "not a stream", ex=60)

        with pytest.raises(redis_errors.ResponseError):
            _relayed_on_loop(platform, platform.database_url, spoilt, marks, spoil)
        assert http.get(f"/v1/jobs/{spoilt.job_id}").json()["status"] == "succeeded"
    finally:
        redis.delete(marks)
        redis.close()


def _text(fields: dict[str, str]) -> str:
    return str(json.loads(fields["d"])["text"])
