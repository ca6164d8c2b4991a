"""The worker's flush pace: crisp while few streams run, bounded in flushes per second."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from inferq.embedded import free_port
from inferq.events import (
    PUBLISH_SCRIPT,
    REFUSED,
    Event,
    cancel_key,
    fence,
    script_args,
    script_keys,
    stream_key,
)
from inferq.lifecycle import Claim
from inferq.models import JobStatus
from inferq.protocol import JobInput, JobParams, ResetData, StatusData, TokenData
from tests.servers import Databases, redis_client
from workers.publisher import BatchedScript, FlushPace, TokenPublisher


def test_flushes_stretch_with_the_streams_of_the_process_and_no_further_than_the_cap() -> None:
    pace = FlushPace(base_s=0.02, budget=400, max_s=0.1)
    assert pace.interval() == 0.02
    with pace.streaming():
        assert pace.interval() == 0.02  # one stream: every 20 ms
        with pace.streaming(), pace.streaming():
            assert pace.active == 3
    assert pace.active == 0
    for _ in range(32):
        pace.active += 1
    assert pace.interval() == 32 / 400  # 400 flushes a second over 32 streams
    pace.active = 1000
    assert pace.interval() == 0.1


def test_the_first_token_of_a_stream_is_written_at_once(databases: Databases) -> None:
    """Not held back for an interval by the `status` write that just preceded it."""
    client = redis_client(databases.redis_url)
    job_id = str(uuid.uuid4())
    now = dt.datetime.now(dt.UTC)
    claim = Claim(
        uuid.uuid4(),
        uuid.uuid4(),
        1,
        "sim",
        JobInput(prompt="-"),
        JobParams(max_tokens=4),
        now,
        None,
    )
    publisher = TokenPublisher(
        client.register_script(PUBLISH_SCRIPT),
        job_id,
        maxlen=100,
        ttl=60,
        pace=FlushPace(base_s=60.0, budget=400, max_s=60.0),  # nothing else is due for a minute
        flush_max_tokens=16,
        claim=claim,
    )
    try:
        publisher.send([Event.of(StatusData(status=JobStatus.running))])
        publisher.add_token("Once")
        publisher.add_token(" upon")
        types = [fields["e"] for _, fields in client.xrange(stream_key(job_id))]
        assert types == ["status", "token"]  # the second token waits for its interval
        publisher.send([Event.of(ResetData(attempt=2))])
        publisher.add_token("Again")  # the first token after a reset goes at once too
        types = [fields["e"] for _, fields in client.xrange(stream_key(job_id))]
        assert types == ["status", "token", "token", "reset", "token"]
    finally:
        client.delete(*script_keys(job_id))
        client.close()


class _Recorded:
    """A histogram that keeps what it was given."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)


def test_a_stream_is_read_once_a_flush_and_to_its_end(databases: Databases) -> None:
    from workers.generate import ReadPace

    client = redis_client(databases.redis_url)
    job_id = str(uuid.uuid4())
    now = dt.datetime.now(dt.UTC)
    request = JobInput(prompt="-"), JobParams(max_tokens=10)
    claim = Claim(uuid.uuid4(), uuid.uuid4(), 1, "sim", *request, now, None)
    publisher = TokenPublisher(
        client.register_script(PUBLISH_SCRIPT),
        job_id,
        maxlen=100,
        ttl=60,
        pace=FlushPace(base_s=0.1, budget=400, max_s=0.1),
        flush_max_tokens=16,
        claim=claim,
    )
    histogram = _Recorded()
    pace = ReadPace(histogram, max_tokens=10)
    try:
        t = time.monotonic()
        publisher.add_token("a", t)  # the first token is flushed at once
        assert pace.read(t, 1, publisher) == 0.0
        # No pace known yet: read on, token by token, until a flush tells the pace.
        publisher.add_token("b", t + 0.01)
        assert pace.read(t + 0.01, 2, publisher) == 0.0
        flushed_at = time.monotonic() + 1.0  # a flush later than every reading above
        publisher.add_token("c", flushed_at)
        assert publisher.last_flush >= flushed_at - 1.0
        pause = pace.read(publisher.last_flush, 3, publisher)
        assert histogram.values  # the gaps so far, averaged
        # Paused until the next flush, or until the last token is due, whichever is first.
        gap = histogram.values[-1]
        assert 0 < pause <= min(0.1, 6 * gap) + 1e-9
        # Near the end the stream is read on, so that its end is seen at once.
        assert pace.read(publisher.last_flush + 0.001, 9, publisher) == 0.0
        pace.end(publisher.last_flush + 0.002)
        assert len(histogram.values) == 3  # one gap a token after the first
    finally:
        client.delete(*script_keys(job_id))
        client.close()


def test_streams_written_together_each_get_their_own_answer(databases: Databases) -> None:
    """Concurrent writes share pipelines; each caller gets its own answer or exception, as
    from the script itself, also once Redis has lost its scripts."""
    client = redis_client(databases.redis_url)
    script = client.register_script(PUBLISH_SCRIPT)
    batched = BatchedScript(client, script)
    sizes: list[int] = []
    pipeline = batched._pipeline

    def counted(batch: list[Any]) -> list[Any]:
        sizes.append(len(batch))
        return pipeline(batch)

    batched._pipeline = counted  # type: ignore[method-assign]
    jobs = [str(uuid.uuid4()) for _ in range(24)]
    token = str(uuid.uuid4())
    # A newer claim has written job 0's stream: this writer's writes there are refused.
    script(keys=script_keys(jobs[0]), args=script_args([], 100, 0, fence(2, token)))
    client.set(cancel_key(jobs[1]), 1)
    start = threading.Barrier(len(jobs))
    answers: dict[str, list[Any]] = {}

    def write(job_id: str) -> None:
        start.wait()
        answers[job_id] = []
        for n in range(20):
            if n == 10 and job_id == jobs[2]:
                client.script_flush()  # Redis restarted: the next writes reload the script
            event = Event.of(TokenData(text=f"{job_id[:4]}-{n}", tokens=1))
            args = script_args([event], 100, 0, fence(1, token))
            answers[job_id].append(batched(keys=script_keys(job_id), args=args))

    threads = [threading.Thread(target=write, args=(job_id,)) for job_id in jobs]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers[jobs[0]] == [REFUSED] * 20
        assert answers[jobs[1]] == [1] * 20  # the cancel flag, to its own writer only
        for job_id in jobs[1:]:
            texts = [json.loads(f["d"])["text"] for _, f in client.xrange(stream_key(job_id))]
            assert texts == [f"{job_id[:4]}-{n}" for n in range(20)]  # in order, once each
        for job_id in jobs[2:]:
            assert answers[job_id] == [0] * 20
        assert max(sizes) > 1  # writes did go together
    finally:
        for job_id in jobs:
            client.delete(*script_keys(job_id))
        client.close()


def test_a_batch_that_cannot_reach_redis_fails_each_caller() -> None:
    client = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    batched = BatchedScript(client, client.register_script(PUBLISH_SCRIPT))
    errors: list[BaseException] = []

    def write(job_id: str) -> None:
        try:
            batched(keys=script_keys(job_id), args=script_args([], 100, 0))
        except redis.ConnectionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(str(n),)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 8
