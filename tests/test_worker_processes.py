"""`inferq worker --processes N`: N independent Celery nodes that share the concurrency."""

from __future__ import annotations

import os
import signal
import socket
import time

import httpx
import psutil

from inferq.queue import make_producer_app
from inferq.settings import Settings
from tests.conftest import Platform, submit, wait_for
from tests.servers import free_port
from workers import nodes


def test_concurrency_is_shared_out_and_names_stay_unique() -> None:
    assert nodes.split(16, 2) == [8, 8]
    assert nodes.split(5, 2) == [3, 2]
    assert nodes.split(1, 3) == [1, 1, 1]  # every node has a thread
    assert nodes.node_names("main@host", 3) == ["main@host", "main-2@host", "main-3@host"]
    assert nodes.node_names(None, 2) == ["inferq-1@%h", "inferq-2@%h"]
    # One process for up to 32 streams (what the tests and the deploy files run), more for
    # more streams, never more than the cores.
    assert nodes.default_processes(16) == 1
    assert nodes.default_processes(32) == 1
    cores = len(os.sched_getaffinity(0))
    assert nodes.default_processes(64) == min(2, cores)
    assert nodes.default_processes(10_000) == cores


def _ping(platform: Platform, names: list[str], seconds: float = 60) -> None:
    app = make_producer_app(
        Settings(database_url=platform.database_url, redis_url=platform.redis_url)
    )
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            replies = app.control.ping(destination=names, timeout=1.0)
            if set(names) <= {name for reply in replies for name in reply}:
                return
        raise AssertionError(f"{names} did not all answer within {seconds}s")
    finally:
        app.close()


def _two_free_ports() -> int:
    """A port that is free, and the next one too."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two free ports in a row")


def test_two_processes_run_jobs_and_stop_together(platform: Platform, http: httpx.Client) -> None:
    metrics_port = _two_free_ports()
    parent = platform.spawn(
        "worker",
        "--models",
        "lonely",
        "--concurrency",
        "4",
        "--processes",
        "2",
        "--name",
        "pair@inferq-test",
        name="worker-pair",
        INFERQ_WORKER_METRICS_PORT=str(metrics_port),
    )
    try:
        _ping(platform, ["pair@inferq-test", "pair-2@inferq-test"])
        # Each node serves its metrics on a port of its own: the configured one, and the next.
        for port in (metrics_port, metrics_port + 1):
            scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
            assert "inferq_jobs_finished" in scrape.text
        nodes_ = psutil.Process(parent.pid).children()
        assert len(nodes_) == 2
        jobs = [
            submit(http, model="lonely", prompt=f"pair {i}", max_tokens=8, seed=i)["id"]
            for i in range(8)
        ]
        for job_id in jobs:
            assert wait_for(http, job_id, timeout=60)["status"] == "succeeded"
        # A stop signal to the parent alone reaches both nodes, and the worker ends.
        os.kill(parent.pid, signal.SIGTERM)
        parent.popen.wait(timeout=60)
        assert parent.popen.returncode == 0
        assert not any(node.is_running() and node.status() != "zombie" for node in nodes_)
    finally:
        parent.stop()


def test_a_node_that_dies_ends_the_worker(platform: Platform) -> None:
    """A supervisor must see the worker go, to start it again whole."""
    parent = platform.spawn(
        "worker",
        "--models",
        "lonely",
        "--concurrency",
        "2",
        "--processes",
        "2",
        "--name",
        "frail@inferq-test",
        name="worker-frail",
    )
    try:
        _ping(platform, ["frail@inferq-test", "frail-2@inferq-test"])
        first, second = psutil.Process(parent.pid).children()
        first.kill()
        parent.popen.wait(timeout=60)
        assert parent.popen.returncode != 0
        second.wait(timeout=10)
    finally:
        parent.stop()
