"""Event streams at the edges: resume ids Redis cannot take, and an API process that stops."""

from __future__ import annotations

import time

import httpx
import pytest
from httpx_sse import connect_sse

from tests.conftest import BOOTSTRAP_KEY, Platform, submit, wait_for
from tests.servers import Child, free_port, wait_http
from tests.sse import Transcript, read

U64_MAX = 2**64 - 1

REFUSED_IDS = [
    f"{U64_MAX + 1}-0",  # past what Redis takes as a stream id
    f"1-{U64_MAX + 1}",
    f"{U64_MAX}-{U64_MAX}",  # nothing can come after it
    "9" * 30,
    "9" * 5000,  # longer than Python turns into an int
    "007-1",  # leading zeros
    "1-01",
    "-1",
    "1--1",
    "+1-0",
    "1-",
    "\u0661\u0662-0",  # digits, but not ASCII ones
    "1-0\n",
    "1 -0",
    "",
]


@pytest.mark.parametrize("where", ["header", "query"])
def test_resume_ids_redis_would_refuse_are_a_422_before_the_stream_starts(
    http: httpx.Client, where: str
) -> None:
    job = submit(http, prompt="ids", max_tokens=4)
    wait_for(http, job["id"])
    url = f"/v1/jobs/{job['id']}/events"
    for value in REFUSED_IDS:
        if where == "header" and (not value or "\n" in value or not value.isascii()):
            continue  # not a header value an HTTP client sends (an empty one is no header)
        if where == "header":
            response = http.get(url, headers={"Last-Event-ID": value})
        else:
            response = http.get(url, params={"after": value})
        assert response.status_code == 422, (value, response.text[:200])
        assert response.json()["error"]["type"] == "invalid_request", value


def test_edge_resume_ids_that_redis_takes_stream_normally(http: httpx.Client) -> None:
    job = submit(http, prompt="edge ids", max_tokens=6)
    stored = wait_for(http, job["id"])
    for value in ("0", "0-0", "1", "1-0"):
        transcript = Transcript()
        with connect_sse(http, "GET", f"/v1/jobs/{job['id']}/events?after={value}") as source:
            assert source.response.status_code == 200
            for event in source.iter_sse():
                transcript.events.append(event)
                if event.event in {"done", "error"}:
                    break
        assert transcript.output() == stored["output"], value


def _api(platform: Platform, name: str) -> tuple[str, Child]:
    port = free_port()
    child = platform.spawn("api", "--port", str(port), name=name)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz", child)
    return url, child


@pytest.mark.timeout(120)
def test_a_stopping_api_ends_its_streams_cleanly_and_clients_resume_on_another(
    platform: Platform, http: httpx.Client
) -> None:
    """SIGTERM: the open streams end at once with a proper end of body and no `done`; the
    client resumes on another API process with Last-Event-ID and misses nothing."""
    url_a, api_a = _api(platform, "api-stopping")
    url_b, _ = _api(platform, "api-staying")
    # Longer than the API's graceful-shutdown timeout, so that only a drained stream ends
    # before the job does.
    job = submit(http, model="slow", prompt="outlive the api", max_tokens=360, seed=17)
    transcript = Transcript()
    headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
    signalled_at = None
    with httpx.Client(base_url=url_a, timeout=30, headers=headers) as client_a:
        transcript.connections += 1
        with connect_sse(client_a, "GET", f"/v1/jobs/{job['id']}/events") as source:
            for event in source.iter_sse():  # a cut body would raise here
                transcript.events.append(event)
                if signalled_at is None and len(transcript.of_type("token")) >= 10:
                    api_a.terminate()
                    signalled_at = time.monotonic()
    assert signalled_at is not None
    ended_after = time.monotonic() - signalled_at
    assert not transcript.ended, "a running job's stream must not say `done` on shutdown"
    assert ended_after < 4.0, f"the stream outlived the signal by {ended_after:.1f}s"
    api_a.popen.wait(timeout=20)

    with httpx.Client(base_url=url_b, timeout=60, headers=headers) as client_b:
        read(client_b, job["id"], transcript)
    stored = wait_for(http, job["id"], timeout=60)
    assert stored["status"] == "succeeded"
    assert transcript.ended
    assert transcript.output() == stored["output"]
    ids = transcript.ids()
    assert len(ids) == len(set(ids)), "an event was delivered twice"
