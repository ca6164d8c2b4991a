"""The sweeper: every lost or orphaned job is enqueued again, ended streams end, beat is watched.

Unit-level tests call `sweep()` with a real WorkerContext on a database of their own; the
others watch the platform's beat do the same.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb
from sqlalchemy import insert, text

from inferq.events import Event, stream_key
from inferq.migrate import upgrade
from inferq.models import Job, JobStatus
from inferq.protocol import StatusData, TokenData
from inferq.queue import (
    ENQUEUED_KEY,
    SWEEPER_LAST_RUN_KEY,
    UNACKED_KEY,
    Enqueue,
    make_producer_app,
    priority_lists,
    sweeper_key,
    task_id_of,
)
from inferq.registry import Registry, queue_prefix_of
from inferq.settings import Settings
from tests import sse
from tests.conftest import Platform, wait_for
from tests.servers import Databases, create_database, drop_database, redis_client
from workers import sweeper
from workers.context import WorkerContext


@pytest.fixture
def ctx(databases: Databases) -> Iterator[WorkerContext]:
    """A worker's context on a fresh database (so its own queue names) and the test Redis."""
    url, name = create_database(databases.admin_url)
    upgrade(url)
    settings = Settings(
        environment="test",
        database_url=url,
        redis_url=databases.redis_url,
        orphan_mark_seconds=30,
        orphan_scan_interval_seconds=0.001,
    )
    context = WorkerContext.create(settings, threads=2)
    # Named as the deployment of `settings` names them, not as this test process would.
    context.registry = Registry.load(None, queue_prefix=queue_prefix_of(settings))
    yield context
    keys = priority_lists(context.registry.queue_of("sim"))
    context.broker.delete(*keys, *context.broker.keys(sweeper_key(name, "*")))
    context.close()
    drop_database(databases.admin_url, name)


def _insert(ctx: WorkerContext, count: int, status: str, **values: Any) -> list[str]:
    ids = [uuid.uuid4() for _ in range(count)]
    rows = [
        {
            "id": job_id,
            "tenant": "default",
            "requested_model": "sim",
            "model": "sim",
            "status": status,
            "priority": "interactive",
            "input": {"prompt": "lost"},
            "params": {"max_tokens": 4},
            "metadata_": {},
            **values,
        }
        for job_id in ids
    ]
    with ctx.sessions.begin() as session:
        session.execute(insert(Job), rows)
        session.execute(text("UPDATE jobs SET created_at = now() - interval '1 minute'"))
    return [str(i) for i in ids]


def _waiting(ctx: WorkerContext) -> list[str]:
    """Job ids of the messages in the sim model's queue, every priority."""
    keys = priority_lists(ctx.registry.queue_of("sim"))
    return [task_id_of(m) or "" for key in keys for m in ctx.broker.lrange(key, 0, -1)]


def test_sweeper_pages_through_more_lost_jobs_than_one_batch(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweeper, "BATCH", 3)
    lost = _insert(ctx, 8, "queued")
    lease = datetime.now(UTC) - timedelta(seconds=5)
    dead = _insert(ctx, 7, "running", attempts=1, lease_expires_at=lease)
    report = sweeper.sweep(ctx)
    assert (report.requeued_lost, report.requeued_expired) == (8, 7)
    assert sorted(_waiting(ctx)) == sorted(lost + dead)
    assert None not in ctx.broker.zmscore(ENQUEUED_KEY, lost + dead)


def test_marked_job_whose_message_is_gone_is_enqueued_again(ctx: WorkerContext) -> None:
    (job_id,) = _insert(ctx, 1, "queued")
    queue = ctx.registry.queue_of("sim")
    ctx.enqueuer.enqueue(ctx.broker, [Enqueue(job_id, queue)])
    ctx.broker.zadd(ENQUEUED_KEY, {job_id: time.time() - 60})  # waiting its turn a while
    assert sweeper.sweep(ctx).requeued_orphaned == 0  # its message is there: no duplicate
    assert _waiting(ctx) == [job_id]

    delivered = ctx.broker.rpop(queue)  # a worker took it and has not acked it yet
    ctx.broker.hset(UNACKED_KEY, "tag-" + job_id, json.dumps([json.loads(delivered), "", queue]))
    try:
        time.sleep(0.01)  # the scan interval of this test's settings
        assert sweeper.sweep(ctx).requeued_orphaned == 0
    finally:
        ctx.broker.hdel(UNACKED_KEY, "tag-" + job_id)

    time.sleep(0.01)
    assert sweeper.sweep(ctx).requeued_orphaned == 1  # the message is gone: enqueued again
    assert _waiting(ctx) == [job_id]
    assert ctx.broker.zscore(ENQUEUED_KEY, job_id) > time.time() - 30  # type: ignore[operator]


def test_queued_job_whose_message_a_dead_worker_took_is_enqueued_again(
    ctx: WorkerContext,
) -> None:
    """A worker took the message (kombu keeps it in its unacked hash, restored only after the
    visibility timeout) and was killed before it could claim the job."""
    ctx.settings = ctx.settings.model_copy(update={"orphan_mark_seconds": 1.0})
    (job_id,) = _insert(ctx, 1, "queued")
    queue = ctx.registry.queue_of("sim")
    ctx.enqueuer.enqueue(ctx.broker, [Enqueue(job_id, queue)])
    ctx.broker.zadd(ENQUEUED_KEY, {job_id: time.time() - 60})  # enqueued a while ago
    app = make_producer_app(ctx.settings)
    connection = app.connection_for_write()
    taken = None
    try:
        channel = connection.channel()
        taken = channel.basic_get(queue)  # delivered as to a worker: into the unacked hash
        assert taken is not None and taken.headers["id"] == job_id
        assert ctx.broker.hexists(UNACKED_KEY, taken.delivery_tag)
        assert sweeper.sweep(ctx).requeued_orphaned == 0  # just taken: its worker may be alive
        time.sleep(1.5)  # no claim for longer than orphan_mark_seconds: its worker died
        report = sweeper.sweep(ctx)
        assert report.requeued_orphaned == 1
        assert _waiting(ctx) == [job_id]
        assert sweeper.sweep(ctx).requeued_orphaned == 0  # the new message waits: no third one
    finally:
        channel.qos.restore_at_shutdown = False  # as a killed worker: nothing put back
        connection.close()
        app.close()
        if taken is not None:  # the hash and its index are shared with the suite's workers
            ctx.broker.hdel(UNACKED_KEY, taken.delivery_tag)
            ctx.broker.zrem(sweeper.UNACKED_INDEX_KEY, taken.delivery_tag)


def test_each_pass_records_its_time_for_the_stall_alert(ctx: WorkerContext) -> None:
    sweeper.sweep(ctx)
    key = sweeper_key(ctx.registry.queue_prefix, SWEEPER_LAST_RUN_KEY)
    assert abs(float(ctx.redis.get(key) or 0) - time.time()) < 60


def test_deployments_on_other_databases_have_other_queues() -> None:
    redis_url = "redis://127.0.0.1:6379/0"
    alpha = Settings(database_url="postgresql+psycopg://db:5432/alpha", redis_url=redis_url)
    beta = Settings(database_url="postgresql://u:p@db/beta?sslmode=require", redis_url=redis_url)
    named = Settings(database_url=alpha.database_url, redis_url=redis_url, queue_prefix="blue")
    default = Settings(redis_url=redis_url)
    queues = [
        Registry.load(None, queue_prefix=queue_prefix_of(s)).queue_of("sim")
        for s in (alpha, beta, named, default)
    ]
    assert queues == ["alpha.sim", "beta.sim", "blue.sim", "inferq.sim"]


# ---------------------------------------------------------------- on the platform


def _prefix(platform: Platform) -> str:
    return queue_prefix_of(Settings(database_url=platform.database_url, redis_url="redis://x"))


def _insert_on(platform: Platform, status: str, **columns: Any) -> str:
    """A job row written straight into the platform's database, created a minute ago."""
    values = {
        "id": str(uuid.uuid4()),
        "tenant": "default",  # the bootstrap key's
        "requested_model": "sim",
        "model": "sim",
        "status": status,
        "priority": "interactive",
        "input": Jsonb({"prompt": "orphan"}),
        "params": Jsonb({"max_tokens": 4}),
        "metadata": Jsonb({}),
        **columns,
    }
    names, marks = ", ".join(values), ", ".join(["%s"] * len(values))
    with psycopg.connect(platform.database_url.replace("+psycopg", ""), autocommit=True) as db:
        db.execute(
            f"INSERT INTO jobs ({names}, created_at) VALUES ({marks}, now() - interval '1 minute')",
            list(values.values()),
        )
    return str(values["id"])


def _active_queues(platform: Platform, node: str, seconds: float = 60) -> set[str]:
    """The queues a worker node says it consumes, once it answers (it may still be starting)."""
    app = make_producer_app(
        Settings(database_url=platform.database_url, redis_url=platform.redis_url)
    )
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            replies = app.control.inspect(destination=[node], timeout=2).active_queues() or {}
            if node in replies:
                return {q["name"] for q in replies[node]}
        raise AssertionError(f"{node} did not answer within {seconds}s")
    finally:
        app.close()


def test_platform_worker_consumes_only_its_deployments_queues(platform: Platform) -> None:
    prefix = _prefix(platform)
    assert prefix.startswith("inferq_test_")  # the test database's name
    queues = _active_queues(platform, "main@inferq-test")
    assert queues == {f"{prefix}.{m}" for m in ("sim", "slow", "faulty", "down", "tiny")}


def test_job_marked_enqueued_without_a_message_runs(platform: Platform, http: httpx.Client) -> None:
    """The message vanished (a Redis failover, a flushed list) while the mark stayed."""
    job_id = _insert_on(platform, "queued")
    client = redis_client(platform.redis_url)
    client.zadd(ENQUEUED_KEY, {job_id: time.time() - 120})
    # Another test may have made beat scan the queues a moment ago: make the next scan due.
    client.delete(sweeper_key(_prefix(platform), sweeper.QUEUES_SCANNED_KEY))
    done = wait_for(http, job_id, timeout=90)
    assert done["status"] == "succeeded"


def test_stream_left_open_by_a_lost_final_publish_is_closed(platform: Platform) -> None:
    """The job ended in Postgres, but its `done` never reached the stream, nor did a TTL."""
    job_id = str(uuid.uuid4())
    key = stream_key(job_id)
    client = redis_client(platform.redis_url)
    for event in (
        Event.of(StatusData(status=JobStatus.running)),
        Event.of(TokenData(text="hi")),
    ):
        client.xadd(key, {"e": event.type.value, "d": event.data})
    now = datetime.now(UTC)
    _insert_on(
        platform,
        "succeeded",
        id=job_id,
        output="hi",
        finish_reason="length",
        input_tokens=3,
        output_tokens=1,
        attempts=1,
        started_at=now,
        finished_at=now,
    )
    transcript = _end_within(platform, job_id, seconds=60)  # a reader waiting on it ends
    assert [e.event for e in transcript.events] == ["status", "token", "status", "done"]
    (done,) = transcript.of_type("done")
    assert done["status"] == "succeeded" and done["usage"]["output_tokens"] == 1
    assert transcript.output() == "hi"
    assert client.ttl(key) > 0


def test_sweeper_last_run_is_exported(platform: Platform) -> None:
    deadline = time.monotonic() + 30
    seen: list[str] = []
    while time.monotonic() < deadline:
        lines = httpx.get(f"{platform.api_url}/metrics", timeout=10).text.splitlines()
        seen = [x for x in lines if x.startswith("inferq_sweeper_last_run_timestamp_seconds ")]
        if seen and time.time() - float(seen[0].split()[-1]) < 60:
            return
        time.sleep(0.5)
    raise AssertionError(f"no recent sweeper run exported: {seen}")


def _read_to_end(platform: Platform, job_id: str) -> sse.Transcript:
    with platform.client() as client:
        return sse.read(client, job_id, sse.Transcript())


def _end_within(platform: Platform, job_id: str, seconds: float) -> sse.Transcript:
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(_read_to_end, platform, job_id).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)
