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
from typing import Any

import httpx
import uvloop

from bench.cache_hit import platform
from bench.clients import Api, Request, read_until
from bench.submit import create_keys
from bench.wire import Frame, KeepAlive

STAGES = ("submit", "to_row", "queued", "claim_to_first_token", "ttft", "e2e")


async def _job(api: Api, connection: KeepAlive, request: Request) -> dict[str, Any]:
    """One job's clock readings (time.time seconds) and its id."""
    times: dict[str, Any] = {"start": time.time()}
    status, body = await connection.post_json("/v1/jobs", json.dumps(request.job("sim")).encode())
    times["submitted"] = time.time()
    if status != 202:
        raise RuntimeError(f"submit {status}: {body[:200]!r}")
    times["id"] = json.loads(body)["id"]
    ended = asyncio.get_running_loop().create_future()

    def on_frame(frame: Frame) -> None:
        if frame.event == "token" and "first_token" not in times:
            times["first_token"] = time.time()
        elif frame.event in ("done", "error") and not ended.done():
            times["end"], times["ending"] = time.time(), frame.event
            ended.set_result(None)

    url = f"{api.url}/v1/jobs/{times['id']}/events"
    await read_until(ended, url, api.headers, on_frame)
    if times.get("ending") != "done" or "first_token" not in times:
        raise RuntimeError(f"job {times['id']} ended without its tokens: {times}")
    return times


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
    try:
        requests = [
            Request(prompt=f"A burst, job {seed}.", max_tokens=tokens, seed=seed)
            for seed in range(first_seed, first_seed + jobs)
        ]
        runs = await asyncio.gather(
            *(_job(api, c, r) for c, r in zip(connections, requests, strict=True))
        )
    finally:
        for connection in connections:
            connection.close()
    async with httpx.AsyncClient(base_url=api.url, headers=api.headers, timeout=60) as http:
        answers = await asyncio.gather(*(http.get(f"/v1/jobs/{t['id']}") for t in runs))
    rows = [answer.json() for answer in answers]
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for times, row in zip(runs, rows, strict=True):
        created, started = _at(row["created_at"]), _at(row["started_at"])
        stages["submit"].append(times["submitted"] - times["start"])
        stages["to_row"].append(created - times["start"])
        stages["queued"].append(started - created)
        stages["claim_to_first_token"].append(times["first_token"] - started)
        stages["ttft"].append(times["first_token"] - times["start"])
        stages["e2e"].append(times["end"] - times["start"])
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
    parser.add_argument("--database-url", help="a Postgres to make a fresh database on")
    parser.add_argument("--redis-url", help="a Redis database (not flushed)")
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
