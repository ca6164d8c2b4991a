"""`inferq up`: the whole platform from wheels, as a newcomer starts it, and Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from inferq.processes import wait_http
from tests.servers import free_port

README = Path(__file__).parent.parent / "README.md"


def walk_through(api_port: int) -> str:
    """The README's walk-through as one shell script, pointed at this test's API port."""
    text = README.read_text()
    section = text[text.index("## Walk-through") : text.index("## OpenAI-compatible API")]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    script = "\n".join(blocks)
    default = "export API=http://127.0.0.1:8000"
    assert default in script, "the walk-through no longer sets API as expected"
    return script.replace(default, f"export API=http://127.0.0.1:{api_port}")


def inferq(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferq", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(300)
def test_up_serves_a_job_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    api, sim, flower = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ports = ["--port", str(api), "--sim-port", str(sim), "--flower-port", str(flower)]
    command = [sys.executable, "-m", "inferq", "up", *ports, "--concurrency", "4"]
    with (tmp_path / "up.log").open("wb") as log:
        up = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for_banner(tmp_path / "up.log", up)
        wait_http(f"http://127.0.0.1:{api}/readyz", timeout=60)
        _check_the_command_line_finds_it(tmp_path, env, api)
        key = (tmp_path / ".inferq" / "dev-api-key").read_text().strip()
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
        _check_worker_series_in_one_scrape(client)
        readme = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", walk_through(api)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert readme.returncode == 0, readme.stdout + readme.stderr
        assert "event: done" in readme.stdout
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


def _check_the_command_line_finds_it(cwd: Path, env: dict[str, str], api: int) -> None:
    second = inferq("up", "--port", str(free_port()), cwd=cwd, env=env)
    assert second.returncode != 0
    refusal = second.stderr.strip()
    assert len(refusal.splitlines()) == 1 and "already running" in refusal, refusal
    assert f":{api}" in refusal
    created = inferq("keys", "create", "from-the-shell", "--tenant", "cli", cwd=cwd, env=env)
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("iq_")
    submitted = inferq("submit", "hello", "--max-tokens", "4", "--json", cwd=cwd, env=env)
    assert submitted.returncode == 0, submitted.stderr
    assert '"succeeded"' in submitted.stdout


def _check_worker_series_in_one_scrape(client: httpx.Client) -> None:
    """The API's /metrics under `inferq up` carries what the worker counted too."""
    deadline = time.monotonic() + 10
    while True:
        text = client.get("/metrics").text
        if 'inferq_jobs_finished_total{model="sim",status="succeeded"}' in text:
            break
        assert time.monotonic() < deadline, "no finished jobs in the API's /metrics"
        time.sleep(0.5)
    for series in ("inferq_ttft_seconds_count", "inferq_output_tokens_total", "inferq_cost_usd"):
        assert series in text, series


def _wait_for_banner(log: Path, up: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while "inferq is ready" not in log.read_text():
        assert up.poll() is None, f"inferq up exited: {log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    assert "model sim" in log.read_text() and "(up)" in log.read_text()
