"""Real servers for the test suite: Postgres and Redis (given or embedded) and inferq processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import redis
from sqlalchemy.engine import make_url

from inferq.embedded import EmbeddedPostgres, EmbeddedRedis, free_port


def create_database(admin_url: str) -> tuple[str, str]:
    """A fresh database beside the one `admin_url` names; returns (url, name)."""
    name = f"inferq_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False), name


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Databases:
    """Postgres and Redis for one test session, real servers either way."""

    admin_url: str
    redis_url: str
    embedded: list[object] = field(default_factory=list)

    @classmethod
    def start(cls, scratch: Path) -> Databases:
        embedded: list[object] = []
        admin_url = os.environ.get("INFERQ_TEST_DATABASE_URL")
        if not admin_url:
            postgres = EmbeddedPostgres.start(scratch / "pg")
            embedded.append(postgres)
            admin_url = postgres.url("postgres")
        redis_url = os.environ.get("INFERQ_TEST_REDIS_URL")
        if not redis_url:
            server = EmbeddedRedis.start(scratch / "redis")
            embedded.append(server)
            redis_url = server.url
        return cls(admin_url, redis_url, embedded)

    def stop(self) -> None:
        for server in self.embedded:
            server.stop()  # type: ignore[attr-defined]


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@dataclass
class Process:
    """An inferq command run as an operator would, in its own process group."""

    args: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        out = self.log.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "inferq", *self.args],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group: no clean shutdown, no acks."""
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


__all__ = [
    "Databases",
    "Process",
    "create_database",
    "drop_database",
    "free_port",
    "redis_client",
    "wait_http",
]
