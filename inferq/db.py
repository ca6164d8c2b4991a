"""Database engines: asyncpg for the API, psycopg for workers and migrations."""

from __future__ import annotations

import os
import select
import time
import uuid
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

STATEMENT_TIMEOUT_MS = 30_000


def driver_url(url: str, driver: str) -> str:
    """The same database URL with an explicit SQLAlchemy driver (asyncpg or psycopg)."""
    parsed = make_url(url)
    return parsed.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


def make_async_engine(url: str, pool_size: int = 20) -> AsyncEngine:
    engine = create_async_engine(
        driver_url(url, "asyncpg"),
        pool_size=pool_size,
        max_overflow=pool_size,
        hide_parameters=True,  # an error's text must never carry a prompt into a log
        connect_args={
            "server_settings": {"statement_timeout": str(STATEMENT_TIMEOUT_MS)},
            "command_timeout": STATEMENT_TIMEOUT_MS / 1000,
        },
    )
    event.listen(engine.sync_engine, "checkout", _check_open)
    return engine


def make_sync_engine(url: str, pool_size: int = 10, max_overflow: int | None = None) -> Engine:
    engine = create_engine(
        driver_url(url, "psycopg"),
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        hide_parameters=True,  # an error's text must never carry a prompt into a log
        connect_args={"options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"},
    )
    event.listen(engine, "checkout", _check_alive)
    return engine


def _check_alive(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection handed out must still be connected (SQLAlchemy's pessimistic
    disconnect handling, by a checkout hook instead of its `pool_pre_ping` query).

    An idle connection has nothing to read: the server sends on it only to answer. When the
    server goes away (a restart, a crash, `pg_terminate_backend`) it sends its farewell and
    closes, or the kernel closes for it, and the socket turns readable. A poll of the socket
    sees that without the ping's round trip, which cost a worker two of its four statements
    a job. Raising DisconnectionError makes the pool drop the connection and hand out
    another, as after a failed ping. A server that vanishes without a word (a host cut off)
    goes unseen by either check until the statement's own timeout.
    """
    if dbapi_connection.closed or dbapi_connection.broken:
        raise exc.DisconnectionError("the connection is closed")
    poll = select.poll()
    poll.register(dbapi_connection.fileno(), select.POLLIN | select.POLLPRI)
    if poll.poll(0):
        raise exc.DisconnectionError("the server closed the connection or spoke unasked")


def _check_open(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled asyncpg connection handed out must still be open: `_check_alive` for the
    API's engine.

    asyncpg reads every connection it holds as the event loop runs, idle ones in the pool
    included, so a server that said goodbye or closed the socket has already marked the
    connection closed by the time it is checked out. No `pool_pre_ping`: on asyncpg it is
    three statements (`BEGIN`, an empty query, `ROLLBACK`), three more round trips to
    Postgres before every submit's INSERT, poll and stats query. As with the worker's check,
    a server that vanishes without a word goes unseen until the statement's own timeout.
    """
    if dbapi_connection.driver_connection.is_closed():
        raise exc.DisconnectionError("the connection is closed")


def async_sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def sync_sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7): 48-bit milliseconds, then random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)
