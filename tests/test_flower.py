"""Flower shows queue health: its HTTP API finds the running worker."""

from __future__ import annotations

import time

import httpx

from tests.conftest import Platform
from tests.servers import free_port, wait_http


def test_flower_api_lists_the_running_worker(platform: Platform) -> None:
    port = free_port()
    flower = platform.spawn(
        "flower", "--port", str(port), name="flower", INFERQ_FLOWER_BASIC_AUTH="ops:secret"
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthcheck", flower)
    assert httpx.get(f"{url}/api/workers").status_code == 401
    deadline = time.monotonic() + 60
    workers: dict = {}
    while "main@inferq-test" not in workers and time.monotonic() < deadline:
        response = httpx.get(
            f"{url}/api/workers", params={"refresh": 1}, auth=("ops", "secret"), timeout=30
        )
        workers = response.json() if response.status_code == 200 else {}
        time.sleep(0.5)
    assert "main@inferq-test" in workers
    queues = {q["name"] for q in workers["main@inferq-test"]["active_queues"]}
    assert {"inferq.sim", "inferq.slow"} <= queues
    lengths = httpx.get(f"{url}/api/queues/length", auth=("ops", "secret"), timeout=30).json()
    assert "active_queues" in lengths
    flower.stop()
