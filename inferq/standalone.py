"""`inferq up`: the whole platform on one machine, on embedded Postgres and Redis."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from inferq.embedded import EmbeddedPostgres, EmbeddedRedis
from inferq.migrate import upgrade
from inferq.processes import Child, stop_all, wait_http


@dataclass(frozen=True)
class Ports:
    api: int = 8000
    sim: int = 8081
    flower: int = 5555


DEFAULT_MODELS = """[models.sim]
backend = "tgi"
url = "http://127.0.0.1:{port}"
max_tokens = 512
"""


def dev_key(data_dir: Path) -> str:
    """A development admin key, made once and kept in the data dir."""
    path = data_dir / "dev-api-key"
    if not path.exists():
        path.write_text("iq_dev_" + secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def _ready(url: str) -> bool:
    try:
        wait_http(url, timeout=30.0)
    except RuntimeError:
        return False
    return True


def run_standalone(ports: Ports, models_file: Path | None, data_dir: Path, concurrency: int) -> int:
    # Ctrl-C and SIGTERM both stop everything, even where SIGINT was inherited as ignored
    # (a background job of a script).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    data_dir = data_dir.resolve()
    with contextlib.ExitStack() as running:
        with contextlib.suppress(KeyboardInterrupt):
            _run(ports, models_file, data_dir, concurrency, running)
        print("\nstopping inferq ...", flush=True)
    return 0


def _run(
    ports: Ports,
    models_file: Path | None,
    data_dir: Path,
    concurrency: int,
    running: contextlib.ExitStack,
) -> None:
    """Start everything, each stop registered on `running` as soon as it has started."""
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    postgres = EmbeddedPostgres.start(data_dir)
    running.callback(postgres.stop)
    redis_server = EmbeddedRedis.start(data_dir / "redis", port=None)
    running.callback(redis_server.stop)
    database_url = postgres.create_database("inferq")
    upgrade(database_url)
    key = dev_key(data_dir)
    env = {
        **os.environ,
        "INFERQ_DATABASE_URL": database_url,
        "INFERQ_REDIS_URL": redis_server.url,
        "INFERQ_BOOTSTRAP_KEY": key,
    }
    if models_file is None:  # one model, `sim`, on the simulator started below
        models_file = data_dir / "models.toml"
        models_file.write_text(DEFAULT_MODELS.format(port=ports.sim))
    env["INFERQ_MODELS_FILE"] = str(models_file.resolve())
    commands = {
        "sim": ["sim", "--port", str(ports.sim)],
        "api": ["api", "--port", str(ports.api)],
        "worker": ["worker", "--concurrency", str(concurrency)],
        "beat": ["beat", "--schedule", str(data_dir / "beat-schedule")],
        "flower": ["flower", "--port", str(ports.flower)],
    }
    children: list[Child] = []
    running.callback(stop_all, children, 10)
    for role, args in commands.items():
        children.append(Child.spawn(role, args, env, logs / f"{role}.log"))
    ready = _ready(f"http://127.0.0.1:{ports.api}/readyz")
    _banner(ports, key, data_dir, ready)
    _watch(children)


def _banner(ports: Ports, key: str, data_dir: Path, ready: bool) -> None:
    state = "ready" if ready else "starting (see logs)"
    print(
        f"""
inferq is {state}
  API          http://127.0.0.1:{ports.api}      (docs: /docs)
  Flower       http://127.0.0.1:{ports.flower}      (admin / inferq)
  simulator    http://127.0.0.1:{ports.sim}      (model "sim")
  dev API key  {key}
  data, logs   {data_dir}

  curl -s http://127.0.0.1:{ports.api}/v1/jobs -H "Authorization: Bearer {key}" \\
       -H "Content-Type: application/json" -d '{{"model": "sim", "prompt": "Hello"}}'

Ctrl-C stops everything.""",
        flush=True,
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _watch(children: list[Child]) -> None:
    while all(child.alive() for child in children):
        time.sleep(0.5)
    dead = [child.role for child in children if not child.alive()]
    print(f"{', '.join(dead)} exited (see its log); stopping", file=sys.stderr)
