"""Postgres and Redis for one run: the given servers, or embedded ones in a temporary dir."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis
from sqlalchemy.engine import make_url

from inferq.embedded import EmbeddedPostgres, EmbeddedRedis
from inferq.migrate import upgrade


@dataclass(frozen=True)
class DataServers:
    """Where the run keeps its data: a fresh database, and a Redis database it shares politely."""

    database_url: str
    redis_url: str
    embedded: bool
    postgres_version: str
    redis_version: str


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """`--database-url` and `--redis-url` of a bench script; without them, embedded servers."""
    parser.add_argument("--database-url", help="a Postgres to make a fresh database on")
    parser.add_argument("--redis-url", help="a Redis database (not flushed)")


def libpq_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new database beside the one `admin_url` names, migrated; dropped afterwards."""
    name = f"inferq_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def data_servers(database_url: str | None, redis_url: str | None) -> Iterator[DataServers]:
    """The given servers, else embedded ones; never flushes a Redis database."""
    with contextlib.ExitStack() as stack:
        embedded = not (database_url and redis_url)
        if not redis_url:
            redis_url = stack.enter_context(redis_or_embedded(None))
        url = stack.enter_context(fresh_database_or_embedded(database_url))
        yield DataServers(url, redis_url, embedded, _pg_version(url), _redis_version(redis_url))


@contextlib.contextmanager
def fresh_database_or_embedded(admin_url: str | None) -> Iterator[str]:
    """A fresh, migrated database on the given server, else on an embedded one; gone after."""
    with contextlib.ExitStack() as stack:
        if not admin_url:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="inferq-bench-")))
            postgres = EmbeddedPostgres.start(scratch / "pg")
            stack.callback(postgres.stop)
            admin_url = postgres.url("postgres")
        yield stack.enter_context(fresh_database(admin_url))


@contextlib.contextmanager
def redis_or_embedded(redis_url: str | None) -> Iterator[str]:
    """The given Redis URL, else an embedded Redis's for as long as the block runs."""
    if redis_url:
        yield redis_url
        return
    with tempfile.TemporaryDirectory(prefix="inferq-bench-") as scratch:
        server = EmbeddedRedis.start(Path(scratch))
        try:
            yield server.url
        finally:
            server.stop()


def _pg_version(url: str) -> str:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def _redis_version(url: str) -> str:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()
