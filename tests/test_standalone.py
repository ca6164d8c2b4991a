"""`inferq up`: the whole platform from wheels, as a newcomer starts it, and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from inferq.processes import wait_http
from tests.servers import free_port


@pytest.mark.timeout(240)
def test_up_serves_a_job_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    api, sim, flower = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    command = [
        sys.executable,
        "-m",
        "inferq",
        "up",
        "--port",
        str(api),
        "--sim-port",
        str(sim),
        "--flower-port",
        str(flower),
        "--data-dir",
        str(tmp_path / "data"),
        "--concurrency",
        "4",
    ]
    with (tmp_path / "up.log").open("wb") as log:
        up = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_http(f"http://127.0.0.1:{api}/readyz", timeout=180)
        key = (tmp_path / "data" / "dev-api-key").read_text().strip()
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{api}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        job = client.post("/v1/jobs", json={"model": "sim", "prompt": "hi", "max_tokens": 5})
        assert job.status_code == 202, job.text
        deadline = time.monotonic() + 60
        while client.get(f"/v1/jobs/{job.json()['id']}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.2)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    output = (tmp_path / "up.log").read_text()
    assert "inferq is ready" in output and "stopping inferq" in output
    for port in (api, sim, flower):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
