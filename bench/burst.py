"""Where a burst's time to first token goes: the submit, the queue, the backend's answer.

    python -m bench.burst [--database-url URL] [--redis-url URL] [--jobs 256]
        [--itl-ms 20] [--tokens 64] [--rounds 3] [--worker-processes 1]

Starts a simulator (50 ms to the first token), one API and a worker with a slot for every
job (`--worker-processes`, one by default), on a fresh database (embedded servers unless
URLs are given), and makes an API key through the admin API. Each round submits `--jobs`
jobs at once, each on a connection of its own, and reads every job's events to `done`, as
the relay phase's 256 clients do when their rounds start together. One JSON line a round,
p50 / p90 / max in ms of each job's:

- `submit`: its POST until the 202;
- `to_row`: until its row was written (`created_at`, the batch's transaction start);
- `queued`: from the row to the worker's claim (`started_at`): the broker, Celery's
  delivery and the claim, one job after the other in the worker's consumer;
- `claim_to_first_token`: from the claim to the client's first token: the stream's
  request, the backend's time to first token, the flush and the relay through the API;
- `ttft` and `e2e`: the client's time to first token and to `done`.

The database server's clock and this process's are the same machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import datetime

import httpx
import uvloop

from bench import clients
from bench.cache_hit import platform
from bench.clients import Api, Request
from bench.servers import add_server_arguments
from bench.submit import create_keys
from bench.wire import KeepAlive

STAGES = ("submit", "to_row", "queued", "claim_to_first_token", "ttft", "e2e")


def _at(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _spread(values: list[float]) -> list[float]:
    """p50, p90 and max, in ms."""
    ordered = sorted(values)
    return [round(ordered[int(len(ordered) * q)] * 1000, 1) for q in (0.5, 0.9)] + [
        round(ordered[-1] * 1000, 1)
    ]


async def _round(api: Api, jobs: int, tokens: int, first_seed: int) -> dict[str, list[float]]:
    connections = [KeepAlive(api.url, api.headers) for _ in range(jobs)]
    requests = [
        Request(prompt=f"A burst, job {seed}.", max_tokens=tokens, seed=seed)
        for seed in range(first_seed, first_seed + jobs)
    ]
    wall = time.time() - time.perf_counter()  # the clients' clock to the database's
    try:
        pairs = zip(connections, requests, strict=True)
        runs = await asyncio.gather(*(clients.platform(c, api, "sim", r) for c, r in pairs))
    finally:
        for connection in connections:
            connection.close()
    failed = [t.error for t in runs if not t.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs failed, the first: {failed[0]}")
    async with httpx.AsyncClient(base_url=api.url, headers=api.headers, timeout=60) as http:
        answers = await asyncio.gather(*(http.get(f"/v1/jobs/{t.job_id}") for t in runs))
    rows = [answer.json() for answer in answers]
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for timing, row in zip(runs, rows, strict=True):
        assert timing.submitted is not None and timing.first_token is not None
        assert timing.end is not None
        start = wall + timing.start
        created, started = _at(row["created_at"]), _at(row["started_at"])
        stages["submit"].append(timing.submitted - timing.start)
        stages["to_row"].append(created - start)
        stages["queued"].append(started - created)
        stages["claim_to_first_token"].append(wall + timing.first_token - started)
        stages["ttft"].append(timing.first_token - timing.start)
        stages["e2e"].append(timing.end - timing.start)
    return {stage: _spread(values) for stage, values in stages.items()}


async def measure(url: str, admin_key: str, args: argparse.Namespace) -> None:
    (key,) = await create_keys(url, admin_key, 1, "burst")
    api = Api(url, {"Authorization": f"Bearer {key}"})
    for round_ in range(args.rounds):
        figures = await _round(api, args.jobs, args.tokens, round_ * args.jobs)
        line = {"round": round_, "jobs": args.jobs, "ms_p50_p90_max": figures}
        print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--jobs", type=int, default=256, help="jobs a burst")
    parser.add_argument("--tokens", type=int, default=64, help="each job's max_tokens")
    parser.add_argument("--itl-ms", type=float, default=20.0, help="the simulator's")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--worker-processes", type=int, default=1, help="`inferq worker --processes`"
    )
    args = parser.parse_args()
    sim = ["--ttft-ms", "50", "--itl-ms", str(args.itl_ms), "--max-concurrent-requests", "4096"]
    worker = ["--concurrency", str(args.jobs + 8), "--processes", str(args.worker_processes)]
    with platform(args.database_url, args.redis_url, sim_args=sim, worker_args=worker) as (
        url,
        key,
        _,
    ):
        uvloop.run(measure(url, key, args))


if __name__ == "__main__":
    main()
