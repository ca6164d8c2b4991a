"""A client reads part of a job's events from one API process and the rest from another.

Behind a load balancer a reconnect lands on any replica: `Last-Event-ID` is all a replica
needs, since the events live in the job's Redis stream (and the job's row), not in the
process that served the first part.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from httpx_sse import connect_sse

from inferq.events import stream_key
from tests.conftest import BOOTSTRAP_KEY, Platform, submit, wait_for
from tests.servers import free_port, redis_client, wait_http
from tests.sse import Transcript, read

MAX_TOKENS = 120


@pytest.fixture(scope="module")
def second_api(platform: Platform) -> Iterator[httpx.Client]:
    """Another API process on the same database, Redis and workers."""
    port = free_port()
    child = platform.spawn("api", "--port", str(port), name="api-second")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz", child)
    headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
    with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        yield client
    child.stop()


def read_part(client: httpx.Client, job_id: str, transcript: Transcript, chars: int) -> None:
    """One connection, dropped by the client once it has `chars` characters of output."""
    transcript.connections += 1
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
        assert source.response.status_code == 200
        for event in source.iter_sse():
            transcript.events.append(event)
            if len(transcript.output()) >= chars or event.event in {"done", "error"}:
                break


def assert_complete(transcript: Transcript, stored: dict[str, object]) -> None:
    assert stored["status"] == "succeeded"
    assert transcript.events[-1].event == "done"
    assert transcript.of_type("done")[-1]["status"] == "succeeded"
    # Byte for byte what the job stored, with no event twice and none out of order.
    assert transcript.output().encode() == str(stored["output"]).encode()
    ids = transcript.ids()
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


def test_a_running_job_read_half_on_one_api_resumes_live_on_another(
    platform: Platform, http: httpx.Client, second_api: httpx.Client
) -> None:
    prompt = "half here, half there"
    expected = platform.sims["slow"].generate(prompt, MAX_TOKENS, seed=5)["generated_text"]
    job = submit(http, model="slow", prompt=prompt, max_tokens=MAX_TOKENS, seed=5)
    transcript = Transcript()
    read_part(http, job["id"], transcript, len(expected) // 2)
    first_part = len(transcript.of_type("token"))
    assert not transcript.ended
    # At 25 ms a token, the other half is still being generated: the second process
    # replays what it missed from the stream, then follows the job live.
    assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    assert transcript.last_id is not None
    read(second_api, job["id"], transcript)
    assert len(transcript.of_type("token")) > first_part
    assert_complete(transcript, wait_for(http, job["id"]))
    assert transcript.connections == 2


def test_a_finished_job_read_half_on_one_api_resumes_on_another(
    http: httpx.Client, second_api: httpx.Client
) -> None:
    job = submit(http, model="sim", prompt="replayed from the stream", max_tokens=64, seed=9)
    stored = wait_for(http, job["id"])
    transcript = Transcript()
    read_part(second_api, job["id"], transcript, len(str(stored["output"])) // 2)
    assert not transcript.ended
    read(http, job["id"], transcript)
    assert_complete(transcript, stored)


def test_a_resume_after_the_stream_expired_starts_the_output_over_from_the_database(
    platform: Platform, http: httpx.Client, second_api: httpx.Client
) -> None:
    job = submit(http, model="sim", prompt="outlived its stream", max_tokens=48, seed=4)
    stored = wait_for(http, job["id"])
    transcript = Transcript()
    read_part(http, job["id"], transcript, 10)
    assert not transcript.ended
    redis_client(platform.redis_url).delete(stream_key(job["id"]))
    read(second_api, job["id"], transcript)
    # The second process cannot place the id: it says `reset`, then the whole output.
    assert transcript.of_type("reset")
    assert_complete(transcript, stored)
