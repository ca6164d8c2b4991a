"""Session fixtures: real Postgres and Redis, simulators, and the platform's own processes."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferq.migrate import upgrade
from inferq.registry import Registry, queue_prefix_of
from inferq.settings import Settings
from tests.faults import Redis
from tests.servers import (
    Child,
    Databases,
    create_database,
    drop_database,
    free_port,
    redis_client,
    wait_http,
)

BOOTSTRAP_KEY = "iq_test_bootstrap_" + "x" * 16
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


@dataclass
class Sim:
    url: str
    process: Child

    def state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/sim/state", timeout=5).json()

    def fault(self, mode: str | None, count: int | None = 1) -> None:
        httpx.post(f"{self.url}/sim/faults", json={"mode": mode, "count": count}, timeout=5)

    def clear_faults(self) -> None:
        httpx.delete(f"{self.url}/sim/faults", timeout=5)

    def generate(self, prompt: str, max_new_tokens: int, seed: int | None) -> dict[str, Any]:
        """What the simulator itself answers for these parameters (the expected output)."""
        body = {
            "inputs": prompt,
            "parameters": {"max_new_tokens": max_new_tokens, "seed": seed, "details": True},
        }
        return httpx.post(f"{self.url}/generate", json=body, timeout=60).json()


@dataclass
class Platform:
    api_url: str
    env: dict[str, str]
    database_url: str
    redis_url: str
    logs: Path
    sims: dict[str, Sim]
    processes: list[Child] = field(default_factory=list)

    def client(self, key: str = BOOTSTRAP_KEY) -> httpx.Client:
        return httpx.Client(
            base_url=self.api_url, timeout=30, headers={"Authorization": f"Bearer {key}"}
        )

    def spawn(self, *args: str, name: str, **env: str) -> Child:
        process = Child.spawn(name, list(args), {**self.env, **env}, self.logs / f"{name}.log")
        self.processes.append(process)
        return process

    def worker(self, name: str, models: str, *, concurrency: int = 2, **env: str) -> Child:
        """`inferq worker` for `models`, as node `NAME@inferq-test`; its log `worker-NAME.log`."""
        return self.spawn(
            "worker",
            "--models",
            models,
            "--concurrency",
            str(concurrency),
            "--name",
            f"{name}@inferq-test",
            name=f"worker-{name}",
            **env,
        )

    def queue(self, model: str) -> str:
        """The queue the platform's processes use for `model` (prefixed by the database's name)."""
        settings = Settings(database_url=self.database_url, redis_url=self.redis_url)
        return Registry.load(None, queue_prefix=queue_prefix_of(settings)).queue_of(model)

    def new_key(self, tenant: str, admin: bool = False) -> str:
        with self.client() as http:
            response = http.post(
                "/v1/admin/keys", json={"name": tenant, "tenant": tenant, "admin": admin}
            )
            response.raise_for_status()
            return str(response.json()["secret"])


MODELS = """
[models.sim]
backend = "tgi"
url = "{fast}"
max_tokens = 256
price_input_per_mtok = 0.25
price_output_per_mtok = 1.25

[models.slow]
backend = "tgi"
url = "{slow}"
max_tokens = 400
price_input_per_mtok = 0.25
price_output_per_mtok = 1.25

[models.faulty]
backend = "tgi"
url = "{faulty}"
max_tokens = 64
price_input_per_mtok = 0.25
price_output_per_mtok = 1.25

[models.lonely]
backend = "tgi"
url = "{slow}"
max_tokens = 400

[models.parked]
backend = "tgi"
url = "{slow}"
max_tokens = 16

[models.down]
backend = "tgi"
url = "http://127.0.0.1:{closed}"
max_tokens = 16

[models.tiny]
backend = "tgi"
url = "{fast}"
max_tokens = 16
context_tokens = 64

[routing]
default = "sim"
[[routing.rules]]
model = "sim"
max_input_tokens = 50
[[routing.rules]]
model = "slow"
keywords = ["prove"]
"""


def _start_sim(name: str, logs: Path, env: dict[str, str], *args: str) -> Sim:
    port = free_port()
    process = Child.spawn(
        f"sim-{name}", ["sim", "--port", str(port), *args], env, logs / f"sim-{name}.log"
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", process)
    return Sim(url, process)


@pytest.fixture(scope="session")
def databases() -> Iterator[Databases]:
    # Not under pytest's temp dir: pytest prunes old numbered dirs, even a running session's
    # when several sessions run at once, and the embedded Postgres must keep its data dir.
    scratch = Path(tempfile.mkdtemp(prefix="inferq-test-servers-"))
    dbs = Databases.start(scratch)
    yield dbs
    dbs.stop()
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="session")
def platform(databases: Databases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    scratch = tmp_path_factory.mktemp("platform")
    logs = Path(os.environ.get("INFERQ_TEST_LOGS", scratch / "logs"))
    logs.mkdir(parents=True, exist_ok=True)
    database_url, db_name = create_database(databases.admin_url)
    upgrade(database_url)
    redis_client(databases.redis_url).flushdb()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    sims = {
        "fast": _start_sim("fast", logs, base_env, "--ttft-ms", "5", "--itl-ms", "2"),
        "slow": _start_sim("slow", logs, base_env, "--ttft-ms", "20", "--itl-ms", "25"),
        "faulty": _start_sim("faulty", logs, base_env, "--ttft-ms", "5", "--itl-ms", "2"),
    }
    models = scratch / "models.toml"
    models.write_text(
        MODELS.format(
            fast=sims["fast"].url,
            slow=sims["slow"].url,
            faulty=sims["faulty"].url,
            closed=free_port(),
        )
    )
    api_port = free_port()
    env = {
        **base_env,
        "INFERQ_ENVIRONMENT": "test",
        "INFERQ_DATABASE_URL": database_url,
        "INFERQ_REDIS_URL": databases.redis_url,
        "INFERQ_MODELS_FILE": str(models),
        "INFERQ_BOOTSTRAP_KEY": BOOTSTRAP_KEY,
        "INFERQ_LEASE_SECONDS": "3",
        "INFERQ_SWEEP_INTERVAL_SECONDS": "0.5",
        "INFERQ_LOST_ENQUEUE_GRACE_SECONDS": "2",
        "INFERQ_BACKEND_RETRY_BASE_SECONDS": "0.05",
        "INFERQ_BACKEND_RETRIES": "3",
        "INFERQ_MAX_PROMPT_CHARS": "20000",
        "INFERQ_LOG_LEVEL": "INFO",
        "INFERQ_WEBHOOK_ALLOW_PRIVATE": "true",  # the tests' receivers listen on 127.0.0.1
        "INFERQ_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
    }
    platform = Platform(
        f"http://127.0.0.1:{api_port}", env, database_url, databases.redis_url, logs, sims
    )
    api = platform.spawn("api", "--port", str(api_port), name="api")
    platform.spawn(
        "worker",
        "--models",
        "sim,slow,faulty,down,tiny",
        "--concurrency",
        "16",
        "--name",
        "main@inferq-test",
        name="worker",
    )
    platform.spawn("beat", "--schedule", str(scratch / "beat-schedule"), name="beat")
    wait_http(f"{platform.api_url}/readyz", api)
    yield platform
    for process in reversed(platform.processes):
        process.stop()
    for sim in sims.values():
        sim.process.stop()
    drop_database(databases.admin_url, db_name)


@pytest.fixture
def lone_redis() -> Iterator[Redis]:
    """A Redis of the test's own, which it may kill, restart empty or reconfigure."""
    server = Redis(Path(tempfile.mkdtemp(prefix="inferq-redis-")), free_port())
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture
def http(platform: Platform) -> Iterator[httpx.Client]:
    with platform.client() as client:
        yield client


def wait_for(
    http: httpx.Client, job_id: str, timeout: float = 30.0, statuses: set[str] = TERMINAL
) -> dict[str, Any]:
    """Poll the job until its status is one of `statuses`."""
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")
        time.sleep(0.05)


def submit(http: httpx.Client, **body: Any) -> dict[str, Any]:
    body.setdefault("model", "sim")
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()
