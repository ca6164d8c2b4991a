"""Flower shows queue health: its HTTP API finds the running worker and follows its tasks."""

from __future__ import annotations

import signal
import subprocess
import sys
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
    assert {platform.queue("sim"), platform.queue("slow")} <= queues
    lengths = httpx.get(f"{url}/api/queues/length", auth=("ops", "secret"), timeout=30).json()
    assert "active_queues" in lengths
    _check_a_task_names_its_model_and_tenant(platform, url)
    flower.stop()


def _check_a_task_names_its_model_and_tenant(platform: Platform, url: str) -> None:
    key = platform.new_key("flower-tenant")
    with platform.client(key) as http:
        job = http.post("/v1/jobs", json={"model": "sim", "prompt": "hi", "max_tokens": 2}).json()
    deadline = time.monotonic() + 30
    task: dict = {}
    # The worker's task events (received, started, succeeded) reach Flower, sent together.
    while task.get("state") != "SUCCESS" and time.monotonic() < deadline:
        response = httpx.get(f"{url}/api/task/info/{job['id']}", auth=("ops", "secret"), timeout=30)
        task = response.json() if response.status_code == 200 else {}
        time.sleep(0.5)
    assert task.get("state") == "SUCCESS", task
    assert task["received"] and task["started"] and task["succeeded"], task
    assert "model=sim" in task.get("args", "") and "tenant=flower-tenant" in task["args"], task


def test_ctrl_c_stops_flower_even_when_sigint_was_ignored(platform: Platform) -> None:
    """A shell's background job inherits SIGINT as ignored; Ctrl-C must still stop Flower."""
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "inferq", "flower", "--port", str(port)],
        env=platform.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthcheck", timeout=60)
        flower.send_signal(signal.SIGINT)
        assert flower.wait(timeout=15) is not None
    finally:
        if flower.poll() is None:
            flower.kill()
