"""What readers waiting for queued jobs cost the API: event streams of jobs no worker takes.

    python -m bench.waiting [--database-url URL] [--redis-url URL] [--readers 500]
        [--hold-s 30] [--rounds 2]

Starts a simulator, one API and one worker on a fresh database (embedded servers unless
URLs are given); the worker serves `sim` only, so the jobs submitted to `idle` stay queued,
as in a backlog. Each round submits `--readers` such jobs, opens each one's event stream
(`GET /v1/jobs/{id}/events`, which shows `queued` and then waits), and after a few seconds
measures the API process's CPU (user + system) for `--hold-s` seconds while they all wait.
One JSON line a round. The streams wake up every few seconds (the API's check for lost
messages, and its keep-alive), and a wake-up of a job without a stream may read its row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import uvloop

from bench.cache_hit import listener, platform
from bench.cluster import cpu_seconds
from bench.servers import add_server_arguments

MODELS = """[models.sim]
backend = "tgi"
url = "{sim}"
[models.idle]
backend = "tgi"
url = "{sim}"
"""
SETTLE_S = 3.0


async def _round(client: httpx.AsyncClient, api: int, args: argparse.Namespace) -> None:
    jobs = []
    for i in range(args.readers):
        answer = await client.post(
            "/v1/jobs", json={"model": "idle", "prompt": f"waiting {i}", "max_tokens": 4}
        )
        answer.raise_for_status()
        jobs.append(answer.json()["id"])

    async def read(job_id: str) -> None:
        async with client.stream("GET", f"/v1/jobs/{job_id}/events") as events:
            async for _ in events.aiter_bytes():
                pass

    readers = [asyncio.create_task(read(job_id)) for job_id in jobs]
    try:
        await asyncio.sleep(SETTLE_S)
        cpu, started = cpu_seconds(api) or 0.0, time.monotonic()
        await asyncio.sleep(args.hold_s)
        cpu, wall = (cpu_seconds(api) or 0.0) - cpu, time.monotonic() - started
        waiting = sum(not reader.done() for reader in readers)  # none ended or failed
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    figures = {
        "readers": args.readers,
        "still_waiting": waiting,
        "hold_s": round(wall, 1),
        "api_cpu_s": round(cpu, 3),
        "api_cores": round(cpu / wall, 4),
    }
    print(json.dumps(figures), flush=True)


async def measure(url: str, key: str, args: argparse.Namespace) -> None:
    api = listener(url).pid
    limits = httpx.Limits(max_connections=args.readers + 8)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=60, limits=limits
    ) as client:
        for _ in range(args.rounds):
            await _round(client, api, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--readers", type=int, default=500, help="queued jobs, a reader each")
    parser.add_argument("--hold-s", type=float, default=30.0, help="seconds measured a round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with platform(args.database_url, args.redis_url, MODELS, worker_models="sim") as (
        url,
        key,
        _,
    ):
        uvloop.run(measure(url, key, args))


if __name__ == "__main__":
    main()
