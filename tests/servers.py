"""Real servers for the test suite: Postgres and Redis (given or embedded) and inferq processes."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis
from sqlalchemy.engine import make_url

from inferq.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from inferq.processes import Child, wait_http


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


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


__all__ = [
    "Child",
    "Databases",
    "create_database",
    "drop_database",
    "free_port",
    "redis_client",
    "wait_http",
]


def start_sim(logs: Path, itl_ms: str, ttft_ms: str = "1", *flags: str) -> tuple[str, Child]:
    """`inferq sim` on a free port, as a process of its own (`flags`: more of its options);
    its URL."""
    port = free_port()
    args = ["-m", "inferq", "sim", "--port", str(port), "--ttft-ms", ttft_ms, "--itl-ms", itl_ms]
    args += flags
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    child = Child.spawn("sim", args, env, logs / f"sim-{itl_ms}.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", child)
    return url, child
