"""The platform's processes for one run: simulators, one API, workers, each in its own group."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
import redis

from bench.config import SimParams
from bench.servers import DataServers, libpq_url
from inferq.embedded import free_port
from inferq.processes import Child, stop_all
from inferq.queue import ENQUEUED_KEY, make_producer_app, priority_lists
from inferq.registry import queue_name
from inferq.settings import Settings

READY_TIMEOUT_S = 60.0
# Celery's Redis transport keeps one list per priority step (priority_lists), plus kombu's
# binding sets.


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of one process and of its living descendants (a worker's nodes, an
    API's uvicorn workers), None once it is gone."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    seconds = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue  # ended meanwhile
        seconds += times.user + times.system
    return seconds


@dataclass(frozen=True)
class ModelEntry:
    """One `[models.NAME]` table of a models file."""

    name: str
    url: str
    queue: str  # the model's queue under the run's prefix (INFERQ_QUEUE_PREFIX), for reports
    max_tokens: int

    def toml(self) -> str:
        return (
            f'[models.{self.name}]\nbackend = "tgi"\nurl = "{self.url}"\n'
            f"max_tokens = {self.max_tokens}\n"
        )


@dataclass(frozen=True)
class Sim:
    url: str
    params: SimParams
    child: Child


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}


@dataclass
class Cluster:
    """Starts and stops the run's processes; every queue name carries the run id."""

    servers: DataServers
    logs: Path
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    api_key: str = field(default_factory=lambda: "iq_bench_" + secrets.token_urlsafe(24))
    children: list[Child] = field(default_factory=list)
    # CPU seconds of the children already stopped, by role, for the per-phase accounting.
    retired_cpu: dict[str, float] = field(default_factory=dict)
    queues: set[str] = field(default_factory=set)

    @property
    def queue_prefix(self) -> str:
        return f"inferq.bench.{self.run_id}"

    def queue(self, model: str) -> str:
        name = queue_name(self.queue_prefix, model)
        self.queues.add(name)
        return name

    def env(self, models_file: Path) -> dict[str, str]:
        return {
            **_clean_env(),
            "INFERQ_DATABASE_URL": self.servers.database_url,
            "INFERQ_REDIS_URL": self.servers.redis_url,
            "INFERQ_MODELS_FILE": str(models_file),
            "INFERQ_BOOTSTRAP_KEY": self.api_key,
            "INFERQ_QUEUE_PREFIX": self.queue_prefix,
            # Event streams of finished jobs need not outlive the run by long.
            "INFERQ_STREAM_TTL_SECONDS": "600",
        }

    def models_file(self, name: str, entries: list[ModelEntry]) -> Path:
        path = self.logs / f"models-{name}.toml"
        path.write_text("\n".join(entry.toml() for entry in entries))
        return path

    def spawn(self, role: str, args: list[str], env: dict[str, str]) -> Child:
        """`python -m ARGS`: a module and its arguments."""
        child = Child.spawn(role, ["-m", *args], env, self.logs / f"{role}.log")
        self.children.append(child)
        return child

    def start_sim(self, role: str, params: SimParams) -> Sim:
        """`inferq sim`, which hands every latency knob on to the simulator as a flag."""
        port = free_port()
        args = ["inferq", "sim", "--port", str(port), *params.args()]
        child = self.spawn(role, args, _clean_env())
        return Sim(f"http://127.0.0.1:{port}", params, child)

    def start_api(
        self, models_file: Path, processes: int = 1, role: str = "api"
    ) -> tuple[str, Child]:
        port = free_port()
        args = ["inferq", "api", "--port", str(port), "--workers", str(processes)]
        child = self.spawn(role, args, self.env(models_file))
        return f"http://127.0.0.1:{port}", child

    def start_worker(
        self,
        node: str,
        models: list[str],
        concurrency: int,
        models_file: Path,
        processes: int | None = None,
        streams: str | None = None,
    ) -> Child:
        """`inferq worker`; with `processes`, that many nodes (the first named `node`);
        `streams`: how it reads its streams (the setting `worker_streams`)."""
        args = ["inferq", "worker", "--models", ",".join(models)]
        args += ["--concurrency", str(concurrency), "--name", self.node_name(node)]
        if processes is not None:
            args += ["--processes", str(processes)]
        env = self.env(models_file)
        if streams is not None:
            env["INFERQ_WORKER_STREAMS"] = streams
        return self.spawn(f"worker-{node}", args, env)

    def node_name(self, node: str) -> str:
        return f"{node}-{self.run_id}@bench"

    def wait_workers(self, nodes: list[str], children: list[Child]) -> None:
        """Wait until each Celery node answers a control ping (it consumes from then on)."""
        self.wait_nodes([self.node_name(n) for n in nodes], children)

    def wait_nodes(self, names: list[str], children: list[Child]) -> None:
        """`wait_workers` by the nodes' full names."""
        settings = Settings(
            database_url=self.servers.database_url, redis_url=self.servers.redis_url
        )
        app = make_producer_app(settings)
        wanted = set(names)
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                dead = [child.role for child in children if not child.alive()]
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} exited (see the logs)")
                replies = app.control.ping(destination=sorted(wanted), timeout=0.5)
                if wanted <= {name for reply in replies for name in reply}:
                    return
            raise RuntimeError(f"workers not ready within {READY_TIMEOUT_S}s: {sorted(wanted)}")
        finally:
            app.close()

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of every child by role, stopped ones included."""
        seconds = dict(self.retired_cpu)
        for child in self.children:
            used = cpu_seconds(child.pid)
            if used is not None:
                seconds[child.role] = seconds.get(child.role, 0.0) + used
        return seconds

    def stop(self, children: list[Child], timeout: float = 15.0) -> None:
        """SIGTERM them all at once, then wait for each (SIGKILL past the timeout)."""
        for child in children:
            used = cpu_seconds(child.pid)
            self.retired_cpu[child.role] = self.retired_cpu.get(child.role, 0.0) + (used or 0.0)
        stop_all(children, timeout)
        for child in children:
            if child in self.children:
                self.children.remove(child)

    def clear_queue(self, queue: str) -> None:
        """Delete one of the run's queues (every priority step) and kombu's bindings of it."""
        keys = priority_lists(queue)
        keys += [f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
        client = redis.Redis.from_url(self.servers.redis_url)
        try:
            client.delete(*keys)
            client.zrem("_kombu.binding_deadlines", queue)
        finally:
            client.close()

    def forget_jobs(self) -> None:
        """Drop the run's job ids from the shared record of enqueued jobs."""
        with psycopg.connect(libpq_url(self.servers.database_url)) as conn:
            ids = [str(row[0]) for row in conn.execute("SELECT id FROM jobs")]
        client = redis.Redis.from_url(self.servers.redis_url)
        try:
            for start in range(0, len(ids), 1000):
                client.zrem(ENQUEUED_KEY, *ids[start : start + 1000])
        finally:
            client.close()

    def close(self) -> None:
        """Stop every child; leave nothing of the run's in the shared Redis database."""
        self.stop(list(self.children))
        for queue in sorted(self.queues):
            self.clear_queue(queue)
        self.forget_jobs()
