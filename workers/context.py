"""Everything a worker process holds: made once when the worker starts, closed at shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from redis import Redis
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from inferq.db import make_sync_engine, sync_sessions
from inferq.events import PUBLISH_SCRIPT
from inferq.lifecycle import Direct, LoopFinish
from inferq.queue import Enqueuer, make_producer_app
from inferq.redis_clients import sync_client
from inferq.registry import Registry, registry_of
from inferq.settings import Settings
from workers.engine import StreamEngine
from workers.interrupts import InterruptWatch
from workers.leases import LeaseKeeper
from workers.publisher import FlushPace

log = logging.getLogger("inferq.worker")
# Redis connections opened ahead: one per generation thread, up to this many.
_MAX_WARM = 64
# Postgres connections of the stream loop, for the jobs it finishes (each a short statement).
_LOOP_DB_CONNECTIONS = 4


def _loop_connections(settings: Settings) -> int:
    """The stream loop's share of the process's Postgres connections: a quarter, up to
    `_LOOP_DB_CONNECTIONS`; none (the jobs' threads finish them) without a loop or with
    fewer than 4 connections in all."""
    if settings.worker_streams != "loop":
        return 0
    return min(_LOOP_DB_CONNECTIONS, settings.worker_db_connections // 4)


@dataclass
class WorkerContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker
    autocommit: Engine  # a single-statement change in one round trip, no BEGIN/COMMIT
    direct: Direct  # every job's claim and finish, on the driver's connections
    redis: Redis
    broker: Redis  # the broker's Redis (the same client when it is one server)
    publish_script: Any
    registry: Registry
    enqueuer: Enqueuer
    leases: LeaseKeeper
    pace: FlushPace
    name: str
    interrupts: InterruptWatch
    streams: StreamEngine | None = None  # the token path's loop (workers/engine.py)

    @classmethod
    def create(cls, settings: Settings, threads: int = 8) -> WorkerContext:
        """Pools sized for `threads` generations at once.

        Every thread may hold a Redis connection while it streams; Postgres is used only for
        a claim and a finish, so a bounded pool serves many threads and keeps a large worker
        within the server's `max_connections` (a thread waits briefly for a connection).
        The pool keeps every connection it opens: an overflow connection would be closed
        as it came back and opened again for the next burst of claims, a Postgres backend
        started and ended each time (docs/performance.md).
        """
        db_connections = min(threads, settings.worker_db_connections - _loop_connections(settings))
        engine = make_sync_engine(settings.database_url, pool_size=db_connections, max_overflow=0)
        sessions = sync_sessions(engine)
        autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        client = sync_client(settings.redis_url, threads + 8)
        broker = (
            client if settings.broker == settings.redis_url else sync_client(settings.broker, 8)
        )
        return cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            autocommit=autocommit,
            direct=Direct(engine),
            redis=client,
            publish_script=client.register_script(PUBLISH_SCRIPT),
            registry=registry_of(settings),
            enqueuer=Enqueuer(make_producer_app(settings)),
            broker=broker,
            leases=LeaseKeeper(
                sync_sessions(autocommit),
                settings.lease_seconds,
                settings.stall_bound_seconds,
            ),
            pace=FlushPace(
                settings.flush_interval_ms / 1000,
                settings.flush_budget_per_second,
                settings.flush_interval_max_ms / 1000,
            ),
            name=f"{socket.gethostname()}:{os.getpid()}",
            interrupts=InterruptWatch(
                client, settings.cancel_poll_seconds, settings.shutdown_grace_seconds
            ),
        )

    def start(self, threads: int) -> None:
        """Ready to run jobs on `threads` threads: the pools' connections open, the lease
        keeper and the cancel watch running, the stream loop (where the settings want one)."""
        self.warm(threads)
        self.leases.start()
        self.interrupts.start()
        self.start_streams()

    def warm(self, threads: int, timeout: float = 10.0) -> None:
        """Open the pools' connections before the first jobs come: a fresh worker given a
        burst of streams would otherwise open them all at once, on its first jobs' time. Best
        effort, within `timeout` (a database or a Redis that is down is waited for by the
        jobs, as always)."""
        thread = threading.Thread(
            target=self._warm, args=(threads,), name="inferq-warm-up", daemon=True
        )
        thread.start()
        thread.join(timeout)

    def _warm(self, threads: int) -> None:
        try:
            with contextlib.ExitStack() as held:
                for _ in range(self.engine.pool.size()):  # type: ignore[attr-defined]
                    held.enter_context(self.autocommit.connect())
            pool = self.redis.connection_pool
            connections = [pool.get_connection() for _ in range(min(threads, _MAX_WARM))]
            for connection in connections:
                pool.release(connection)
        except Exception as exc:
            log.warning("warming the worker's connections up failed: %s", exc)

    def start_streams(self) -> None:
        """The loop that reads the backend streams, where the settings want one."""
        if self.settings.worker_streams == "loop" and self.streams is None:
            settings = self.settings
            connections = _loop_connections(settings)
            self.streams = StreamEngine(
                settings.redis_url,
                self.pace,
                flush_max_tokens=settings.flush_max_tokens,
                outage_s=settings.redis_outage_seconds,
                finishes=LoopFinish(settings.database_url, connections) if connections else None,
            )
            self.streams.start()

    def close(self) -> None:
        if self.streams is not None:
            self.streams.stop()
        self.leases.stop()
        self.interrupts.stop()
        self.enqueuer.close()
        if self.broker is not self.redis:
            self.broker.close()
        self.redis.close()
        self.engine.dispose()
