"""Live tokens: resumable SSE, late readers, fan-out, cancel, and a worker replaced mid-job."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
import time

import httpx
import pytest
from httpx_sse import connect_sse

from inferq.events import stream_key
from tests.conftest import BOOTSTRAP_KEY, Platform, submit, wait_for
from tests.servers import redis_client
from tests.sse import Transcript, aread, read


def test_tokens_read_across_random_disconnects_equal_the_stored_output(
    platform: Platform, http: httpx.Client
) -> None:
    rng = random.Random(1234)
    jobs = [
        submit(http, model="slow", prompt=f"resume {i}", max_tokens=48, seed=i) for i in range(6)
    ]
    for job in jobs:
        transcript = Transcript()
        while not transcript.ended:
            read(http, job["id"], transcript, max_events=rng.randint(1, 6))
            assert transcript.connections < 500
        stored = wait_for(http, job["id"])
        assert transcript.connections > 2
        assert transcript.output() == stored["output"]
        ids = transcript.ids()
        assert len(ids) == len(set(ids)), "an event was delivered twice"
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
        assert transcript.of_type("done")[-1]["status"] == "succeeded"


def test_reader_that_arrives_late_still_reads_everything(
    platform: Platform, http: httpx.Client
) -> None:
    job = submit(http, model="slow", prompt="late reader", max_tokens=40, seed=3)
    wait_for(http, job["id"], statuses={"running"})
    time.sleep(0.3)  # some tokens are out already
    while_running = read(http, job["id"], Transcript())
    stored = wait_for(http, job["id"])
    after_finish = read(http, job["id"], Transcript())
    assert while_running.output() == after_finish.output() == stored["output"]

    redis_client(platform.redis_url).delete(stream_key(job["id"]))  # the stream expired
    from_database = read(http, job["id"], Transcript())
    assert from_database.output() == stored["output"]
    assert (
        from_database.of_type("done")[0]["usage"]["output_tokens"]
        == stored["usage"]["output_tokens"]
    )
    resumed = Transcript(events=while_running.events[:3])
    read(http, job["id"], resumed)  # an old Last-Event-ID on an expired stream
    assert resumed.output() == stored["output"]


def test_reader_of_a_queued_job_sees_its_status_then_the_end(http: httpx.Client) -> None:
    job = submit(http, model="parked", prompt="waits", max_tokens=3)
    transcript = Transcript()
    reader = threading.Thread(target=read, args=(http, job["id"], transcript))
    reader.start()
    time.sleep(0.5)
    assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    reader.join(timeout=10)
    assert transcript.of_type("status")[0] == {"status": "queued"}
    assert transcript.of_type("done")[-1]["status"] == "cancelled"


def _open_sse_connections(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("inferq_sse_connections "):
            return float(line.split()[1])
    raise AssertionError("no inferq_sse_connections gauge")


def test_a_reader_that_hangs_up_on_a_silent_job_is_let_go(http: httpx.Client) -> None:
    """No event will come to notice the hang-up by; the server must see the disconnect."""
    job = submit(http, model="parked", prompt="nobody will finish me", max_tokens=3)
    before = _open_sse_connections(http)
    with connect_sse(http, "GET", f"/v1/jobs/{job['id']}/events") as source:
        events = source.iter_sse()  # held: dropping the iterator closes the connection
        assert next(events).event == "status"
        assert _open_sse_connections(http) == before + 1
    deadline = time.monotonic() + 10
    while _open_sse_connections(http) > before:
        assert time.monotonic() < deadline, "the stream outlived its client"
        time.sleep(0.05)
    assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200


async def _fan_out(
    platform: Platform, job_ids: list[str], readers_per_job: int, subscriptions: list[list[str]]
) -> list[Transcript]:
    limits = httpx.Limits(max_connections=1000)
    async with httpx.AsyncClient(
        base_url=platform.api_url,
        limits=limits,
        timeout=60,
        headers={"Authorization": f"Bearer {BOOTSTRAP_KEY}"},
    ) as client:
        tasks = [
            asyncio.create_task(aread(client, job_id))
            for job_id in job_ids
            for _ in range(readers_per_job)
        ]
        await asyncio.sleep(0.5)
        subscriptions.append(_api_pubsub_connections(platform))
        return await asyncio.gather(*tasks)


def _api_pubsub_connections(platform: Platform) -> list[str]:
    """The API's Redis connections that hold subscriptions (its hub's, if all is well)."""
    client = redis_client(platform.redis_url)
    db = client.connection_pool.connection_kwargs.get("db", 0)
    # Only this session's API: other sessions may share the server on other databases.
    clients = [c for c in client.client_list() if int(c.get("db", -1)) == int(db)]
    return [
        f"{c['addr']} sub={c['sub']} age={c['age']} cmd={c['cmd']}"
        for c in clients
        if c.get("name") == "inferq-api" and int(c.get("sub", 0)) > 0
    ]


def test_dozens_of_readers_on_one_job_share_one_subscription(
    platform: Platform, http: httpx.Client
) -> None:
    job = submit(http, model="slow", prompt="popular", max_tokens=60, seed=5)
    seen: list[list[str]] = []
    transcripts = asyncio.run(_fan_out(platform, [job["id"]], 40, seen))
    stored = wait_for(http, job["id"])
    assert all(t.output() == stored["output"] for t in transcripts)
    assert len(seen[0]) == 1, seen


def test_hundreds_of_jobs_stream_at_once_through_one_api_process(
    platform: Platform, http: httpx.Client
) -> None:
    jobs = [submit(http, prompt=f"crowd {i}", max_tokens=24, seed=i) for i in range(200)]
    seen: list[list[str]] = []
    transcripts = asyncio.run(_fan_out(platform, [j["id"] for j in jobs], 1, seen))
    for job, transcript in zip(jobs, transcripts, strict=True):
        assert transcript.output() == wait_for(http, job["id"])["output"]
    assert len(seen[0]) == 1, seen


def test_cancel_running_job_frees_backend_slot(platform: Platform, http: httpx.Client) -> None:
    sim = platform.sims["slow"]
    job = submit(http, model="slow", prompt="a long story", max_tokens=400, seed=11)
    transcript = Transcript()
    reader = threading.Thread(target=read, args=(http, job["id"], transcript))
    reader.start()
    _wait_until(lambda: len(transcript.of_type("token")) >= 3)
    assert sim.state()["active"] >= 1
    response = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code in (200, 202)
    _wait_until(lambda: sim.state()["active"] == 0, timeout=1.0)
    stored = wait_for(http, job["id"])
    reader.join(timeout=10)
    assert stored["status"] == "cancelled"
    assert stored["finish_reason"] == "cancelled"
    assert stored["output"] and transcript.output() == stored["output"]
    assert transcript.of_type("done")[-1]["status"] == "cancelled"


def test_cancelled_job_is_charged_for_the_tokens_it_produced(
    platform: Platform, http: httpx.Client
) -> None:
    job = submit(http, model="slow", prompt="a story to stop early", max_tokens=400, seed=12)
    transcript = Transcript()
    reader = threading.Thread(target=read, args=(http, job["id"], transcript))
    reader.start()
    _wait_until(lambda: len(transcript.of_type("token")) >= 3)
    assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    stored = wait_for(http, job["id"])
    reader.join(timeout=10)
    assert stored["status"] == "cancelled"
    usage = stored["usage"]
    assert usage["output_tokens"] > 0
    # TGI counts the prompt only as its stream ends: a cut stream's input is estimated.
    assert usage["input_tokens"] > 0
    cost = (usage["input_tokens"] * 0.25 + usage["output_tokens"] * 1.25) / 1e6
    assert usage["cost_usd"] > 0
    assert usage["cost_usd"] == pytest.approx(cost)
    assert transcript.of_type("done")[-1]["usage"] == usage


def test_worker_killed_mid_generation_is_replaced_and_readers_see_reset(
    platform: Platform, http: httpx.Client
) -> None:
    first = platform.worker("doomed", "lonely")
    job = submit(http, model="lonely", prompt="survive a crash", max_tokens=200, seed=21)
    transcript = Transcript()
    reader = threading.Thread(target=read, args=(http, job["id"], transcript))
    reader.start()
    _wait_until(lambda: len(transcript.of_type("token")) >= 5, timeout=30)
    first.kill()
    heir = platform.worker("heir", "lonely")
    try:
        stored = wait_for(http, job["id"], timeout=60)
        reader.join(timeout=30)
    finally:
        heir.stop()
    expected = platform.sims["slow"].generate("survive a crash", 200, seed=21)
    assert stored["status"] == "succeeded"
    assert stored["attempts"] == 2
    assert stored["output"] == expected["generated_text"]
    assert transcript.of_type("reset"), "readers must be told the output restarts"
    assert transcript.output() == stored["output"]


def _wait_until(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.02)


def test_submit_command_streams_tokens_as_they_arrive(platform: Platform) -> None:
    env = {**platform.env, "INFERQ_API_URL": platform.api_url, "INFERQ_API_KEY": BOOTSTRAP_KEY}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "inferq",
            "submit",
            "stream me",
            "--model",
            "sim",
            "--max-tokens",
            "12",
            "--stream",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    expected = platform.sims["fast"].generate("stream me", 12, seed=None)["generated_text"]
    assert result.stdout.strip() == expected.strip()


def test_reconnecting_after_done_is_answered_204_at_once(http: httpx.Client) -> None:
    """A browser's EventSource reconnects even after a clean close, sending the id of `done`;
    the job has nothing more to say, and a 204 is what stops EventSource from retrying."""
    job = submit(http, prompt="all of it", max_tokens=5, seed=2)
    transcript = read(http, job["id"], Transcript())
    assert transcript.ended and transcript.last_id
    again = http.get(
        f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": transcript.last_id}, timeout=5
    )
    assert again.status_code == 204 and again.content == b""
    before_done = transcript.ids()[-2]
    rest = http.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": before_done})
    assert rest.status_code == 200 and "event: done" in rest.text
