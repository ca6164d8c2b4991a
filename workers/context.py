"""Everything a worker process holds: made once when the worker starts, closed at shutdown."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from inferq.db import make_sync_engine, sync_sessions
from inferq.events import PUBLISH_SCRIPT
from inferq.queue import Enqueuer, make_producer_app
from inferq.registry import Registry
from inferq.settings import Settings
from workers.leases import LeaseKeeper


@dataclass
class WorkerContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker
    redis: redis.Redis
    publish_script: Any
    registry: Registry
    enqueuer: Enqueuer
    leases: LeaseKeeper
    name: str

    @classmethod
    def create(cls, settings: Settings, pool_size: int = 10) -> WorkerContext:
        engine = make_sync_engine(settings.database_url, pool_size=pool_size)
        sessions = sync_sessions(engine)
        client = redis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=30,
            socket_connect_timeout=10,
            health_check_interval=30,
            max_connections=pool_size * 2 + 4,
        )
        return cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            redis=client,
            publish_script=client.register_script(PUBLISH_SCRIPT),
            registry=Registry.load(settings.models_file),
            enqueuer=Enqueuer(make_producer_app(settings), client),
            leases=LeaseKeeper(sessions, settings.lease_seconds),
            name=f"{socket.gethostname()}:{os.getpid()}",
        )

    def close(self) -> None:
        self.leases.stop()
        self.enqueuer.close()
        self.redis.close()
        self.engine.dispose()
