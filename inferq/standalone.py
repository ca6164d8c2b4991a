"""`inferq up`: the whole platform on one machine, on embedded Postgres and Redis."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from inferq.embedded import EmbeddedPostgres, EmbeddedRedis
from inferq.migrate import upgrade

SIM_PORT = 8081
FLOWER_PORT = 5555


def dev_key(data_dir: Path) -> str:
    """A development admin key, made once and kept in the data dir."""
    path = data_dir / "dev-api-key"
    if not path.exists():
        path.write_text("iq_dev_" + secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "inferq", *args],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_http(url: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def run_standalone(port: int, models_file: Path | None, data_dir: Path, concurrency: int) -> int:
    data_dir = data_dir.resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    postgres = EmbeddedPostgres.start(data_dir)
    redis_server = EmbeddedRedis.start(data_dir / "redis", port=None)
    database_url = postgres.create_database("inferq")
    upgrade(database_url)
    key = dev_key(data_dir)
    env = {
        **os.environ,
        "INFERQ_DATABASE_URL": database_url,
        "INFERQ_REDIS_URL": redis_server.url,
        "INFERQ_BOOTSTRAP_KEY": key,
    }
    if models_file is not None:
        env["INFERQ_MODELS_FILE"] = str(models_file.resolve())
    children = [
        _spawn(["sim", "--port", str(SIM_PORT)], env, logs / "sim.log"),
        _spawn(["api", "--port", str(port)], env, logs / "api.log"),
        _spawn(["worker", "--concurrency", str(concurrency)], env, logs / "worker.log"),
        _spawn(["beat", "--schedule", str(data_dir / "beat-schedule")], env, logs / "beat.log"),
        _spawn(["flower", "--port", str(FLOWER_PORT)], env, logs / "flower.log"),
    ]
    try:
        ready = _wait_http(f"http://127.0.0.1:{port}/readyz")
        _banner(port, key, data_dir, ready)
        _watch(children)
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping inferq ...", flush=True)
        _stop(children)
        redis_server.stop()
        postgres.stop()
    return 0


def _banner(port: int, key: str, data_dir: Path, ready: bool) -> None:
    state = "ready" if ready else "starting (see logs)"
    print(
        f"""
inferq is {state}
  API          http://127.0.0.1:{port}      (docs: /docs)
  Flower       http://127.0.0.1:{FLOWER_PORT}      (admin / inferq)
  simulator    http://127.0.0.1:{SIM_PORT}      (model "sim")
  dev API key  {key}
  data, logs   {data_dir}

  curl -s http://127.0.0.1:{port}/v1/jobs -H "Authorization: Bearer {key}" \\
       -H "Content-Type: application/json" -d '{{"model": "sim", "prompt": "Hello"}}'

Ctrl-C stops everything.""",
        flush=True,
    )


def _watch(children: list[subprocess.Popen[bytes]]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    while all(child.poll() is None for child in children):
        time.sleep(0.5)
    dead = [c.args for c in children if c.poll() is not None]
    print(f"a process exited: {dead}; stopping", file=sys.stderr)


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
