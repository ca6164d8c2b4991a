"""What a streamed job costs the API process: its submit, its event stream, its live events.

    python -m bench.api_job [--database-url URL] [--redis-url URL] [--clients 32]
        [--jobs 2000] [--tokens 16] [--itl-ms 5] [--repeat 3]

Starts a simulator, one API and one worker on a fresh database (embedded servers unless
URLs are given), and makes an API key through the admin API. `--clients` closed loops, as
the relay phase's platform clients (kept-alive submits, a lean SSE reader), each submit a
job with that key (`--tokens` tokens, the response cache off) and read its events to
`done`. One JSON line a round of `--jobs` jobs: the API process's CPU (user + system) over
the round's jobs, and the token events the clients read a job.
The simulator's inter-token latency sets how many live events a job brings: at 0 its tokens
come in one or two writes of the worker, and the figure is the two requests' own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import uvloop

from bench import clients
from bench.cache_hit import listener, platform
from bench.clients import Api, Request, Timing
from bench.cluster import cpu_seconds
from bench.servers import add_server_arguments
from bench.submit import create_keys
from bench.wire import KeepAlive

PROMPT = "Say something about queues."


async def _client(
    api: Api, submits: KeepAlive, jobs: asyncio.Queue[int], tokens: int, out: list[Timing]
) -> None:
    while not jobs.empty():
        seed = jobs.get_nowait()
        request = Request(prompt=f"{PROMPT} {seed}", max_tokens=tokens, seed=seed)
        out.append(await clients.platform(submits, api, "sim", request))


async def _round(api: Api, clients_: int, jobs: int, tokens: int, first: int) -> list[Timing]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for seed in range(first, first + jobs):
        queue.put_nowait(seed)
    out: list[Timing] = []
    connections = [KeepAlive(api.url, api.headers) for _ in range(clients_)]
    try:
        await asyncio.gather(*(_client(api, c, queue, tokens, out) for c in connections))
    finally:
        for connection in connections:
            connection.close()
    return out


async def measure(url: str, admin_key: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    (key,) = await create_keys(url, admin_key, 1, "api-job")  # a user's key, not the bootstrap
    api = Api(url, {"Authorization": f"Bearer {key}"})
    api_pid = listener(url).pid
    await _round(api, args.clients, args.clients * 4, args.tokens, 1_000_000)  # warm-up
    results = []
    for round_ in range(args.repeat):
        before, started = cpu_seconds(api_pid) or 0.0, time.perf_counter()
        timings = await _round(api, args.clients, args.jobs, args.tokens, round_ * args.jobs)
        wall = time.perf_counter() - started
        cpu = (cpu_seconds(api_pid) or 0.0) - before
        failed = [t.error for t in timings if not t.ok]
        events = sum(t.token_events for t in timings)
        if failed:
            raise RuntimeError(f"{len(failed)} jobs failed, the first: {failed[0]}")
        results.append(
            {
                "jobs": len(timings),
                "clients": args.clients,
                "tokens": args.tokens,
                "itl_ms": args.itl_ms,
                "token_events_per_job": round(events / len(timings), 2),
                "jobs_per_s": round(len(timings) / wall, 1),
                "api_cpu_ms_per_job": round(cpu * 1000 / len(timings), 3),
                "api_cores": round(cpu / wall, 3),
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs a round")
    parser.add_argument("--tokens", type=int, default=16, help="each job's max_tokens")
    parser.add_argument("--itl-ms", type=float, default=5.0, help="the simulator's")
    parser.add_argument("--repeat", type=int, default=3, help="rounds")
    args = parser.parse_args()
    sim = ["--ttft-ms", "0", "--itl-ms", str(args.itl_ms), "--max-concurrent-requests", "1024"]
    worker = ["--concurrency", str(max(16, args.clients)), "--processes", "1"]
    with platform(args.database_url, args.redis_url, sim_args=sim, worker_args=worker) as (
        url,
        key,
        _,
    ):
        for result in uvloop.run(measure(url, key, args)):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
