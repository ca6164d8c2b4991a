"""The worker's flush pace: crisp while few streams run, bounded in flushes per second."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from inferq.events import PUBLISH_SCRIPT, Event, script_keys, stream_key
from inferq.lifecycle import Claim
from inferq.models import JobStatus
from inferq.protocol import JobInput, JobParams, ResetData, StatusData
from tests.servers import Databases, redis_client
from workers.publisher import FlushPace, TokenPublisher


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
    # Nothing else is due for a minute.
    publisher = _publisher(client, job_id, FlushPace(base_s=60.0, budget=400, max_s=60.0), 4)
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


def _publisher(client: Any, job_id: str, pace: FlushPace, max_tokens: int) -> TokenPublisher:
    """A first attempt's publisher of the job's events."""
    request = JobInput(prompt="-"), JobParams(max_tokens=max_tokens)
    claim = Claim(uuid.uuid4(), uuid.uuid4(), 1, "sim", *request, dt.datetime.now(dt.UTC), None)
    script = client.register_script(PUBLISH_SCRIPT)
    return TokenPublisher(
        script, job_id, maxlen=100, ttl=60, pace=pace, flush_max_tokens=16, claim=claim
    )


class _Recorded:
    """An inter-token histogram of its own: how many gaps it was given, and their sum."""

    def __init__(self) -> None:
        self.histogram = Histogram("gap_seconds", "gap", registry=CollectorRegistry())

    def observed(self) -> tuple[int, float]:
        (family,) = self.histogram.collect()
        value = {sample.name: sample.value for sample in family.samples}
        return int(value["gap_seconds_count"]), value["gap_seconds_sum"]


def test_a_stream_is_read_once_a_flush_and_to_its_end(databases: Databases) -> None:
    from workers.generate import ReadPace

    client = redis_client(databases.redis_url)
    job_id = str(uuid.uuid4())
    publisher = _publisher(client, job_id, FlushPace(base_s=0.1, budget=400, max_s=0.1), 10)
    recorded = _Recorded()
    pace = ReadPace(recorded.histogram, max_tokens=10)
    try:
        t = time.monotonic()
        publisher.add_token("a", t)  # the first token is flushed at once
        assert pace.read(t, 1, publisher) == 0.0
        # No pace known yet: read on, token by token, until a flush tells the pace.
        publisher.add_token("b", t + 0.01)
        assert pace.read(t + 0.01, 2, publisher) == 0.0
        # The flush below comes at least 20 ms after the first token: a pace of 10 ms a token
        # or more, however quickly this test runs (at less than a third of a millisecond a
        # token, the stream would read on instead of pausing).
        time.sleep(0.02)
        flushed_at = time.monotonic() + 1.0  # a flush later than every reading above
        publisher.add_token("c", flushed_at)
        assert publisher.last_flush >= flushed_at - 1.0
        pause = pace.read(publisher.last_flush, 3, publisher)
        count, total = recorded.observed()
        assert count == 2  # the gaps so far, averaged: the two tokens after the first
        # Paused until the next flush, or until the last token is due, whichever is first.
        gap = total / count
        assert 0 < pause <= min(0.1, 6 * gap) + 1e-9
        # Near the end the stream is read on, so that its end is seen at once.
        assert pace.read(publisher.last_flush + 0.001, 9, publisher) == 0.0
        pace.end(publisher.last_flush + 0.002)
        assert recorded.observed()[0] == 3  # one gap a token after the first
    finally:
        client.delete(*script_keys(job_id))
        client.close()


def test_a_write_carries_the_callers_commands_in_its_round_trip(databases: Databases) -> None:
    """The start of a job: its `status`, its start count and its enqueue mark's removal in one
    round trip; also once Redis has lost its scripts."""
    client = redis_client(databases.redis_url)
    job_id = str(uuid.uuid4())
    marks = f"inferq:test-marks:{job_id}"
    publisher = _publisher(client, job_id, FlushPace(base_s=0.02, budget=400, max_s=0.1), 4)
    try:
        client.zadd(marks, {job_id: 1.0})
        client.script_flush()
        running = Event.of(StatusData(status=JobStatus.running))
        assert publisher.send([running], also=lambda pipe: pipe.zrem(marks, job_id)) is False
        assert client.zscore(marks, job_id) is None
        assert [fields["e"] for _, fields in client.xrange(stream_key(job_id))] == ["status"]
    finally:
        client.delete(marks, *script_keys(job_id))
        client.close()
