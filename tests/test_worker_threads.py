"""A worker whose streams run on their jobs' threads (`INFERQ_WORKER_STREAMS=threads`, and
what the loop leaves to huggingface_hub: HTTPS, a proxy, a redirect): the same stream and
stored output as the loop's, a cancel that frees the backend's slot."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from inferq.queue import make_producer_app
from inferq.settings import Settings
from tests.conftest import Platform, submit, wait_for
from tests.servers import Child
from tests.sse import Transcript, read
from tests.test_metrics import eventually


@pytest.fixture(scope="module")
def threaded(platform: Platform) -> Iterator[Child]:
    """The `lonely` model (the slow simulator), served by a worker of its own on threads."""
    worker = platform.worker("threads", "lonely", concurrency=4, INFERQ_WORKER_STREAMS="threads")
    yield worker
    worker.stop()


def test_a_stream_on_its_thread_is_the_backends_text(
    platform: Platform, http: httpx.Client, threaded: Child
) -> None:
    job = submit(http, model="lonely", prompt="a thread's story", max_tokens=40, seed=5)
    transcript = read(http, job["id"], Transcript())
    stored = wait_for(http, job["id"])
    expected = platform.sims["slow"].generate("a thread's story", 40, seed=5)
    assert stored["status"] == "succeeded"
    assert stored["output"] == transcript.output() == expected["generated_text"]
    logs = platform.logs
    assert (
        "backend streams read on their jobs' threads" in (logs / "worker-threads.log").read_text()
    )
    assert "backend streams read on one event loop" in (logs / "worker.log").read_text()


def test_a_cancel_on_the_thread_frees_the_backends_slot(
    platform: Platform, http: httpx.Client, threaded: Child
) -> None:
    sim = platform.sims["slow"]
    job = submit(http, model="lonely", prompt="a long thread", max_tokens=400, seed=6)
    transcript = Transcript()
    reader = threading.Thread(target=read, args=(http, job["id"], transcript))
    reader.start()
    eventually(lambda: len(transcript.of_type("token")) >= 3, "three tokens read", 20)
    assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
    eventually(lambda: sim.state()["active"] == 0, "the backend's slot freed", 2)
    stored = wait_for(http, job["id"])
    reader.join(timeout=10)
    assert stored["status"] == "cancelled"
    assert stored["output"] and transcript.output() == stored["output"]


def test_a_ready_worker_has_started_every_thread_of_its_pool(platform: Platform) -> None:
    """The threads pool starts a thread a task until it has them all; a worker starts them
    when it is ready, so that its first burst of jobs does not wait for them."""
    app = make_producer_app(
        Settings(database_url=platform.database_url, redis_url=platform.redis_url)
    )
    node = "main@inferq-test"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            replies = app.control.inspect(destination=[node], timeout=2).stats() or {}
            if node in replies:
                break
        pool = replies[node]["pool"]
        assert pool["max-concurrency"] > 1
        assert pool["threads"] == pool["max-concurrency"]
    finally:
        app.close()
