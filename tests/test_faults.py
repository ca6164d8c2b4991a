"""Faults under load: a worker killed, Redis restarted empty, Postgres restarted.

Jobs arrive at a steady rate from several tenants' keys (some keys first used while a fault
is on), a third of them read live over SSE by readers that reconnect with Last-Event-ID
whenever their connection breaks. Meanwhile the test kills a worker mid-stream (and starts
another), restarts Redis with no data, and crashes and restarts Postgres. The contract: every
submit gets a 202 or a clean 429/503 with Retry-After and the error
envelope; every accepted job succeeds with exactly the simulator's text; every reader ends
with `done`, and its tokens after the last `reset` are the stored output byte for byte.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from huggingface_hub import InferenceClient

from inferq.events import PUBLISH_SCRIPT, Event, EventType, progress, stream_key
from inferq.lifecycle import Claim, Outcome
from inferq.models import JobStatus
from inferq.processes import Child
from inferq.protocol import JobInput, JobParams, ResetData, StatusData
from inferq.queue import UNACKED_KEY, Enqueue, Enqueuer, make_producer_app
from inferq.redis_clients import sync_client
from inferq.registry import Registry, queue_prefix_of
from inferq.settings import Settings
from tests.faults import (
    BOOTSTRAP_KEY,
    Clients,
    FaultPlatform,
    JobSpec,
    Ledger,
    Redis,
    expected_output,
    follow,
    log_excerpts,
    submit,
    wait_terminal,
    write_summary,
)
from tests.servers import start_sim
from workers.backends.base import GenerationRequest
from workers.backends.tgi import TextGenerationStream
from workers.engine import StreamEngine
from workers.publisher import ClaimLost, FlushPace, RedisUnavailable, TokenPublisher

pytestmark = pytest.mark.timeout(300)

JOBS = 270
RATE_PER_S = 12.0
READ_EVERY = 3  # every third job is also read live
HANG_UP_AFTER = 6  # events; a reader then resumes on the other API process
TENANTS = ("acme", "globex", "initech")
WORKER_KILL_AT_S, REDIS_AT_S, POSTGRES_AT_S = 4.0, 9.0, 15.0
REDIS_DOWN_S, POSTGRES_DOWN_S = 2.0, 3.0
DRAIN_S = 75.0  # the generous bound for every job to end once submissions stop


@dataclass
class Fault:
    name: str
    started: float  # monotonic
    started_wall: float  # Unix time, to compare with the jobs' timestamps
    back: float | None = None  # monotonic: the dependency is up again
    in_flight: list[str] = field(default_factory=list)  # the killed worker's running jobs


@dataclass
class KeyRing:
    """Warm keys in turn; a cold key (never used yet) takes the next few jobs when a fault
    strikes, so that its first use finds the platform in trouble, then joins the turn."""

    active: list[tuple[str, str]]
    cold: list[tuple[str, str]]
    burst: deque[tuple[str, str]] = field(default_factory=deque)
    turn: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next(self) -> tuple[str, str]:
        with self.lock:
            if self.burst:
                return self.burst.popleft()
            self.turn += 1
            return self.active[self.turn % len(self.active)]

    def wake_cold(self) -> None:
        with self.lock:
            key = self.cold.pop(0)
            self.burst.extend([key] * 4)
            self.active.append(key)


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[FaultPlatform]:
    # Servers' data not under pytest's temp dir, which pytest may prune while it runs.
    scratch = Path(tempfile.mkdtemp(prefix="inferq-faults-"))
    given = os.environ.get("INFERQ_TEST_LOGS")
    logs = Path(given) / "faults" if given else tmp_path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    platform = FaultPlatform.start(scratch, logs, apis=2, workers=3)
    yield platform
    platform.stop()
    shutil.rmtree(scratch, ignore_errors=True)


def _new_key(api_url: str, tenant: str, **limits: int) -> tuple[str, str]:
    body = {"name": f"{tenant}-{len(limits)}", "tenant": tenant, **limits}
    headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
    response = httpx.post(f"{api_url}/v1/admin/keys", json=body, headers=headers, timeout=30)
    assert response.status_code == 201, response.text
    return tenant, str(response.json()["secret"])


def _keys(api_url: str) -> KeyRing:
    warm = [_new_key(api_url, tenant) for tenant in TENANTS]
    # One key with a rate limit: its 429s must stay clean while Redis comes and goes.
    warm.append(_new_key(api_url, "initech", rate_limit_per_minute=40))
    cold = [_new_key(api_url, tenant) for tenant in TENANTS]
    return KeyRing(warm, cold)


def _spec(index: int, tenant: str, key: str) -> JobSpec:
    return JobSpec(
        index=index,
        tenant=tenant,
        key=key,
        prompt=f"fault drill {index} for {tenant}: report the state of the queue",
        max_tokens=24 + (index * 7) % 40,
        seed=1000 + index,
        read_live=index % READ_EVERY == 0,
        # Readers also hang up now and then, as flaky networks do, to resume elsewhere.
        drop_every=HANG_UP_AFTER + index % 4,
    )


@dataclass
class Load:
    """Submits JOBS specs at RATE_PER_S from a pool of threads; a reader follows every
    READ_EVERY-th accepted job."""

    clients: Clients
    ledger: Ledger
    ring: KeyRing
    reader_deadline: float
    specs: dict[int, JobSpec] = field(default_factory=dict)
    started: float = 0.0
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(128))

    def run(self) -> None:
        self.started = time.monotonic()
        for index in range(JOBS):
            if self.ledger.stop.is_set():
                return
            time.sleep(max(0.0, self.started + index / RATE_PER_S - time.monotonic()))
            spec = _spec(index, *self.ring.next())
            self.specs[index] = spec
            self.pool.submit(self._one, spec)

    def _one(self, spec: JobSpec) -> None:
        job_id = submit(self.clients, self.ledger, spec)
        if job_id is None:
            return
        with self.ledger.lock:
            self.ledger.accepted[spec.index] = job_id
        if spec.read_live:
            follow(self.clients, self.ledger, spec, job_id, self.reader_deadline)


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def _running_on(platform: FaultPlatform, role: str) -> list[str]:
    worker = f"{socket.gethostname()}:{platform.children[role].pid}"
    with platform.database() as conn:
        rows = conn.execute(
            "SELECT id FROM jobs WHERE status = 'running' AND worker = %s", (worker,)
        ).fetchall()
    return [str(row[0]) for row in rows]


def kill_worker(platform: FaultPlatform, ring: KeyRing) -> Fault:
    """SIGKILL a worker while it streams (up to 5 s to find it busy), start a new one."""
    deadline = time.monotonic() + 5
    running = _running_on(platform, "worker-1")
    while not running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = _running_on(platform, "worker-1")
    fault = Fault("worker killed", time.monotonic(), time.time(), in_flight=running)
    ring.wake_cold()
    platform.kill("worker-1")
    platform.start_worker("worker-4")
    fault.back = time.monotonic()
    return fault


def restart_redis(platform: FaultPlatform, ring: KeyRing) -> Fault:
    fault = Fault("redis restarted empty", time.monotonic(), time.time())
    ring.wake_cold()
    platform.redis.kill()
    time.sleep(REDIS_DOWN_S)
    platform.redis.start()
    fault.back = time.monotonic()
    return fault


def restart_postgres(platform: FaultPlatform, ring: KeyRing) -> Fault:
    fault = Fault("postgres crashed and restarted", time.monotonic(), time.time())
    ring.wake_cold()
    platform.postgres.crash()
    time.sleep(POSTGRES_DOWN_S)
    platform.postgres.start()
    fault.back = time.monotonic()
    return fault


def inject_faults(platform: FaultPlatform, ring: KeyRing, start: float) -> list[Fault]:
    """Each fault at its time after `start`, one after the other."""
    _sleep_until(start + WORKER_KILL_AT_S)
    faults = [kill_worker(platform, ring)]
    _sleep_until(start + REDIS_AT_S)
    faults.append(restart_redis(platform, ring))
    _sleep_until(start + POSTGRES_AT_S)
    faults.append(restart_postgres(platform, ring))
    return faults


def _epoch(stamp: str | None) -> float | None:
    return dt.datetime.fromisoformat(stamp).timestamp() if stamp else None


def _fault_figures(
    fault: Fault, until: float, ledger: Ledger, jobs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """What clients saw from the fault until `until` (the next fault, or the end): refused
    submits and for how long, and how long until every job in flight at the fault ended."""
    assert fault.back is not None
    answers = [a for a in ledger.answers if fault.started <= a.started < until]
    refused = [a for a in answers if a.what == "submit" and a.status in (429, 503)]
    first_ok = min(
        (a.ended for a in answers if a.status == 202 and a.started >= fault.back), default=None
    )
    ends = [
        _epoch(job.get("finished_at")) or float("inf")
        for job in jobs.values()
        if (_epoch(job["created_at"]) or 0) < fault.started_wall
        and (_epoch(job.get("finished_at")) or float("inf")) > fault.started_wall
    ]
    window = max((a.ended for a in refused), default=fault.started) - min(
        (a.started for a in refused), default=fault.started
    )
    last = max(ends, default=fault.started_wall) - fault.started_wall
    return {
        "fault": fault.name,
        "down_s": round(fault.back - fault.started, 2),
        "submits_refused": dict(Counter(str(a.status) for a in refused)),
        "submits_refused_over_s": round(window, 2),
        "first_202_after_back_s": None if first_ok is None else round(first_ok - fault.back, 2),
        "jobs_in_flight": len(ends),
        "jobs_on_the_killed_worker": len(fault.in_flight),
        "in_flight_all_ended_after_s": None if last == float("inf") else round(last, 2),
    }


def _check_jobs(load: Load, jobs: dict[str, dict[str, Any]], oracle_url: str) -> list[str]:
    failures = []
    for index, job_id in sorted(load.ledger.accepted.items()):
        spec, job = load.specs[index], jobs.get(job_id)
        if job is None or job["status"] != "succeeded":
            state = "never read" if job is None else f"{job['status']} {job.get('error')}"
            failures.append(f"job {index} ({job_id}) did not succeed: {state}")
            continue
        expected = expected_output(oracle_url, spec)
        if job["output"] != expected:
            failures.append(
                f"job {index} ({job_id}) output differs from the simulator's:"
                f" {job['output']!r} != {expected!r}"
            )
    return failures


def _check_readers(load: Load, jobs: dict[str, dict[str, Any]]) -> list[str]:
    failures = []
    for job_id, transcript in sorted(load.ledger.transcripts.items()):
        stored = (jobs.get(job_id) or {}).get("output")
        if not transcript.ended or transcript.events[-1].event != "done":
            last = transcript.events[-1].event if transcript.events else "nothing"
            failures.append(
                f"reader of {job_id} did not end with done (last: {last},"
                f" {transcript.connections} connections)"
            )
        elif json.loads(transcript.events[-1].data).get("status") != "succeeded":
            failures.append(f"reader of {job_id}: done says {transcript.events[-1].data}")
        elif transcript.output() != stored:
            failures.append(
                f"reader of {job_id} ({transcript.connections} connections,"
                f" {len(transcript.of_type('reset'))} resets) read {transcript.output()!r},"
                f" stored {stored!r}"
            )
    return failures


def _summary(
    load: Load, jobs: dict[str, dict[str, Any]], faults: list[Fault], elapsed: float
) -> dict[str, Any]:
    ledger = load.ledger
    untils = [f.started for f in faults[1:]] + [float("inf")]
    figures = [_fault_figures(f, u, ledger, jobs) for f, u in zip(faults, untils, strict=True)]
    transcripts = list(ledger.transcripts.values())
    return {
        "jobs_submitted": len(load.specs),
        "submit_answers": dict(ledger.statuses("submit")),
        "accepted": len(ledger.accepted),
        "refused_on_every_try": len(ledger.given_up),
        "succeeded": sum(1 for j in jobs.values() if j["status"] == "succeeded"),
        "live_readers": len(transcripts),
        "reader_connections": sum(t.connections for t in transcripts),
        "readers_that_reconnected": sum(1 for t in transcripts if t.connections > 1),
        "readers_that_saw_reset": sum(1 for t in transcripts if t.of_type("reset")),
        "event_answers": dict(ledger.statuses("events")),
        "stream_breaks": dict(ledger.breaks),
        "restarts": {"worker": 1, "redis": 1, "postgres": 1},
        "faults": figures,
        "max_recovery_s": max(f["in_flight_all_ended_after_s"] or float("inf") for f in figures),
        "elapsed_s": round(elapsed, 1),
    }


def test_jobs_and_streams_survive_a_killed_worker_and_restarted_redis_and_postgres(
    faulty: FaultPlatform,
) -> None:
    ring = _keys(faulty.api_urls[0])
    clients = Clients(faulty.api_urls)
    load_started = time.monotonic()
    submissions_end = load_started + JOBS / RATE_PER_S
    load = Load(clients, Ledger(), ring, reader_deadline=submissions_end + DRAIN_S)
    pacer = threading.Thread(target=load.run, name="faults-load")
    pacer.start()
    try:
        faults = inject_faults(faulty, ring, load_started)
        pacer.join()
        load.pool.shutdown(wait=True)
        ids = {job_id: load.specs[i].key for i, job_id in load.ledger.accepted.items()}
        jobs = wait_terminal(clients, load.ledger, ids, submissions_end + DRAIN_S)
    finally:
        load.ledger.stop.set()  # on a failure above, the clients give up at once
        pacer.join()
        load.pool.shutdown(wait=True, cancel_futures=True)
        clients.close()

    summary = _summary(load, jobs, faults, time.monotonic() - load_started)
    write_summary(faulty.logs / "faults-summary.json", summary)
    print("\nfault test summary:\n" + json.dumps(summary, indent=2))

    answers = [f"answer not allowed under faults: {p}" for p in load.ledger.problems()]
    job_failures = _check_jobs(load, jobs, faulty.oracle_url)
    reader_failures = _check_readers(load, jobs)
    other = []
    if not faults[0].in_flight:
        other.append("the killed worker was running no job: the test missed its mark")
    dead = [role for role, child in faulty.children.items() if not child.alive()]
    if dead:
        other.append(f"processes exited: {dead}")
    if len(load.ledger.accepted) < JOBS // 2:
        other.append(f"only {len(load.ledger.accepted)} of {JOBS} jobs were accepted")
    groups = (other, answers, job_failures, reader_failures)
    failures = [line for group in groups for line in group[:10]]
    assert not failures, (
        f"{len(other)} other failures, {len(answers)} answers not allowed,"
        f" {len(job_failures)} jobs, {len(reader_failures)} readers; the first of each:\n"
        + "\n".join(failures)
        + f"\n\nsummary: {json.dumps(summary)}\n\nlogs ({faulty.logs}):\n"
        + log_excerpts(faulty.logs)
    )


# ----- one part at a time: a Redis of the test's own, restarted empty ----------------------


def _claim(attempt: int) -> Claim:
    now = dt.datetime.now(dt.UTC)
    request = JobInput(prompt="-"), JobParams(max_tokens=1)
    return Claim(uuid.uuid4(), uuid.uuid4(), attempt, "sim", *request, now, None)


def _publisher(client: redis.Redis, job_id: str, claim: Claim, outage_s: float) -> TokenPublisher:
    return TokenPublisher(
        client.register_script(PUBLISH_SCRIPT),
        job_id,
        maxlen=1000,
        ttl=60,
        pace=FlushPace(0.0, 400, 0.0),  # every token is flushed at once
        flush_max_tokens=1,
        claim=claim,
        outage_s=outage_s,
    )


def _restart_later(server: Redis, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), server.start()))
    thread.start()
    return thread


def test_a_stream_outlives_redis_restarting_empty_and_ends_equal_to_the_text(
    lone_redis: Redis,
) -> None:
    client = sync_client(lone_redis.url, 4)
    job_id = str(uuid.uuid4())
    claim = _claim(attempt=2)
    publisher = _publisher(client, job_id, claim, outage_s=30)
    publisher.send([Event.of(StatusData(status=JobStatus.running))])
    for text in ("Once ", "upon "):
        publisher.add_token(text)
    lone_redis.kill()  # the stream, the claim key and the script are gone with it
    comeback = _restart_later(lone_redis, 1.0)
    publisher.add_token("a ")  # waits for Redis, then shows the whole text again
    comeback.join()
    publisher.add_token("time")
    succeeded = Outcome(JobStatus.succeeded, finish_reason="length")
    publisher.send(succeeded.closing_events(), final=True)

    events = [Event.from_entry(i, f) for i, f in client.xrange(stream_key(job_id))]
    assert [e.type for e in events[:2]] == [EventType.reset, EventType.token]
    assert events[0].parse(ResetData).attempt == 2
    assert progress(events).text == "Once upon a time"
    assert progress(events).tokens == 4
    # The claim fence holds on the emptied Redis: an older attempt may not write any more.
    with pytest.raises(ClaimLost):
        _publisher(client, job_id, _claim(attempt=1), outage_s=1).add_token("stale")
    client.close()


def test_a_stream_lost_while_its_writer_was_idle_is_written_again_from_its_start(
    lone_redis: Redis,
) -> None:
    """Redis restarts empty between two writes: the writer's pooled connection reconnects
    without an error, so only the claim missing from Redis tells that the stream is gone. A
    reader resuming after an event that went with it must still end with the whole text."""
    client = sync_client(lone_redis.url, 4)
    job_id = str(uuid.uuid4())
    publisher = _publisher(client, job_id, _claim(attempt=1), outage_s=30)
    publisher.send([Event.of(StatusData(status=JobStatus.running))])
    for text in ("Once ", "upon "):
        publisher.add_token(text)
    seen = client.xrange(stream_key(job_id))[-2][0]  # a reader saw up to "Once "
    lone_redis.kill()
    lone_redis.start()
    publisher.add_token("a ")  # no error on the way: the connection is simply new
    publisher.add_token("time")
    publisher.send(Outcome(JobStatus.succeeded, finish_reason="length").closing_events())

    resumed = [Event.from_entry(i, f) for i, f in client.xrange(stream_key(job_id), min=seen)]
    assert [e.type for e in resumed[:2]] == [EventType.reset, EventType.token]
    assert progress(resumed).text == "Once upon a time"
    assert progress(resumed).tokens == 4
    client.close()


def test_the_stream_loop_writes_a_stream_lost_mid_relay_again_from_its_start(
    lone_redis: Redis, tmp_path: Path
) -> None:
    """The same on the worker's stream loop: Redis loses every stream's keys while a relay
    runs (no connection fails); the next write starts the text over."""
    url, sim = start_sim(tmp_path, "10")
    client = sync_client(lone_redis.url, 4)
    engine = StreamEngine(lone_redis.url, FlushPace(0.02, 400, 0.02), flush_max_tokens=4)
    engine.start()
    try:
        job_id = str(uuid.uuid4())
        publisher = _publisher(client, job_id, _claim(attempt=1), outage_s=30)
        publisher.lead([Event.of(StatusData(status=JobStatus.running))])
        sink = _FlushingSink(publisher, client, after=20)
        request = GenerationRequest(prompt="tell", messages=None, max_tokens=60, seed=4)
        stream = TextGenerationStream(InferenceClient(model=url, api_key="-"), request)
        lean = stream.lean_request()
        assert lean is not None
        assert engine.relay(stream, lean, 30, sink).wait() is False
        publisher.send(Outcome(JobStatus.succeeded, finish_reason="length").closing_events())
    finally:
        engine.stop()
        sim.stop()
    events = [Event.from_entry(i, f) for i, f in client.xrange(stream_key(job_id))]
    assert sink.flushed and EventType.reset in [e.type for e in events]
    assert progress(events).text == "".join(sink.deltas)
    assert progress(events).tokens == len(sink.deltas) > sink.after
    client.close()


class _FlushingSink:
    """Relays into a publisher; empties Redis once `after` tokens were read."""

    def __init__(self, publisher: TokenPublisher, client: redis.Redis, after: int) -> None:
        self.publisher, self.client, self.after = publisher, client, after
        self.max_tokens = 60
        self.deltas: list[str] = []
        self.flushed = False

    def ending(self) -> None:
        return None

    def took(self, deltas: list[str], now: float) -> None:
        self.deltas += deltas
        self.publisher.extend(deltas)
        if not self.flushed and len(self.deltas) >= self.after and self.publisher.showed_tokens:
            self.client.flushdb()  # as a failover to a replica that was behind
            self.flushed = True


def test_a_publisher_gives_up_on_a_redis_that_stays_away(lone_redis: Redis) -> None:
    client = sync_client(lone_redis.url, 4)
    publisher = _publisher(client, str(uuid.uuid4()), _claim(attempt=1), outage_s=1)
    publisher.add_token("first")
    lone_redis.kill()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable):
        publisher.add_token("second")
    assert time.monotonic() - started < 20  # the bound, not a hang
    client.close()


def test_a_worker_outlives_redis_restarting_empty_and_serves_again(
    lone_redis: Redis, tmp_path: Path
) -> None:
    """Celery's worker loses its broker connection while it holds a message it has not
    acknowledged (its task is running); it must reconnect once Redis is back (empty) rather
    than exit while it cleans up the lost connection."""
    # A "database" that takes connections and never answers: the task waits in its claim.
    silent = socket.create_server(("127.0.0.1", 0))
    settings = Settings(
        environment="test",
        redis_url=lone_redis.url,
        database_url=f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/lone",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env |= {
        "INFERQ_ENVIRONMENT": "test",
        "INFERQ_REDIS_URL": settings.redis_url,
        "INFERQ_DATABASE_URL": settings.database_url,
    }
    node = "lone@faults"
    log = tmp_path / "worker.log"
    worker = Child.spawn(
        "worker", ["worker", "--models", "sim", "--concurrency", "2", "--name", node], env, log
    )
    app = make_producer_app(settings)
    client = sync_client(lone_redis.url, 4)
    try:
        _ping_until_answered(app, node, worker)
        queue = Registry.load(None, queue_prefix=queue_prefix_of(settings)).queue_of("sim")
        Enqueuer(app).enqueue(client, [Enqueue(str(uuid.uuid4()), queue)])
        _until(lambda: client.hlen(UNACKED_KEY) == 1)  # taken, running, not acknowledged
        lone_redis.kill()
        time.sleep(2.0)
        lone_redis.start()
        _ping_until_answered(app, node, worker)
        assert worker.alive(), log.read_text()[-3000:]
    finally:
        client.close()
        app.close()
        silent.close()
        worker.stop()


def _until(predicate: Any, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _ping_until_answered(app: Any, node: str, worker: Child, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert worker.alive(), "the worker exited"
        with contextlib.suppress(Exception):  # Redis may still be coming back
            if app.control.ping(destination=[node], timeout=1.0):
                return
        time.sleep(0.2)
    raise AssertionError(f"{node} did not answer within {seconds}s")
