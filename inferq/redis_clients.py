"""Redis clients for every process: blocking pools, explicit timeouts.

A blocking pool makes a burst wait for a free connection instead of failing with
"Too many connections"; every socket operation has a deadline.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis


def _options(max_connections: int, wait_s: float) -> dict[str, Any]:
    return {
        "max_connections": max_connections,
        "timeout": wait_s,  # for a free connection
        "decode_responses": True,
        "socket_timeout": 30,
        "socket_connect_timeout": 10,
        "health_check_interval": 30,
    }


def sync_client(url: str, max_connections: int, wait_s: float = 30) -> redis.Redis:
    pool = redis.BlockingConnectionPool.from_url(url, **_options(max_connections, wait_s))
    return redis.Redis.from_pool(pool)


def async_client(
    url: str, max_connections: int, wait_s: float = 10, name: str | None = None
) -> aioredis.Redis:
    options = _options(max_connections, wait_s)
    if name:
        options["client_name"] = name
    pool = aioredis.BlockingConnectionPool.from_url(url, **options)
    return aioredis.Redis.from_pool(pool)
