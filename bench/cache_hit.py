"""A response-cache hit through the API: submit to `done`, at N concurrent clients.

    python -m bench.cache_hit [--database-url URL] [--redis-url URL] [--clients 16]

Starts a simulator, one API and one worker on a fresh database (embedded servers unless
URLs are given), answers one deterministic request to fill the cache, then has each client
send that request again and again: POST /v1/jobs (a hit: the job is created already
`succeeded`), then GET its events until `done`. Prints the latency percentiles of the
whole round and of the submit alone, and checks that the backend was called once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.cluster import cpu_seconds
from bench.servers import add_server_arguments, data_servers
from inferq.embedded import free_port
from inferq.processes import Child, stop_all, wait_http

BODY = {"model": "sim", "prompt": "What is a queue?", "max_tokens": 32, "seed": 1}


async def _round(client: httpx.AsyncClient) -> tuple[float, float]:
    """(submit ms, submit-to-done ms) of one hit."""
    start = time.perf_counter()
    response = await client.post("/v1/jobs", json=BODY)
    submitted = time.perf_counter()
    job = response.json()
    if response.status_code != 202 or not job.get("cached"):
        raise RuntimeError(f"not a cache hit: {response.status_code} {job}")
    async with client.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
        async for line in events.aiter_lines():
            if line == "event: done":
                break
    return (submitted - start) * 1000, (time.perf_counter() - start) * 1000


async def _client(url: str, key: str, rounds: int, out: list[tuple[float, float]]) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        for _ in range(rounds):
            out.append(await _round(client))


def _percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100)
    return {"p50": round(cuts[49], 2), "p95": round(cuts[94], 2), "p99": round(cuts[98], 2)}


def listener(url: str) -> psutil.Process:
    """The process that listens on the URL's port (the API)."""
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return psutil.Process(conn.pid)
    raise RuntimeError(f"nothing listens on {url}")


async def measure(url: str, key: str, clients: int, rounds: int) -> dict[str, Any]:
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as client:
        first = (await client.post("/v1/jobs", json=BODY)).json()
        while first["status"] not in ("succeeded", "failed"):
            await asyncio.sleep(0.05)
            first = (await client.get(f"/v1/jobs/{first['id']}")).json()
    warm: list[tuple[float, float]] = []
    await asyncio.gather(*(_client(url, key, 5, warm) for _ in range(clients)))
    timed: list[tuple[float, float]] = []
    api = listener(url).pid
    cpu_before = cpu_seconds(api) or 0.0
    started = time.perf_counter()
    await asyncio.gather(*(_client(url, key, rounds, timed) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    api_cpu = (cpu_seconds(api) or 0.0) - cpu_before
    return {
        "clients": clients,
        "hits": len(timed),
        "hits_per_second": round(len(timed) / elapsed, 1),
        "submit_to_done_ms": _percentiles([t[1] for t in timed]),
        "submit_ms": _percentiles([t[0] for t in timed]),
        # The API's CPU per hit (its two requests): what bounds hits/s per API core.
        "api_cpu_ms_per_hit": round(api_cpu * 1000 / len(timed), 3),
    }


@contextlib.contextmanager
def platform(
    database_url: str | None,
    redis_url: str | None,
    models_text: str | None = None,
    worker_models: str = "sim",
    sim_args: Sequence[str] = (),
    worker_args: Sequence[str] = (),
) -> Iterator[tuple[str, str, str]]:
    """(API URL, key, simulator URL) of a platform started for this run; `models_text` is a
    models file with `{sim}` for the simulator's URL (default: one model, `sim`), and the
    worker serves `worker_models` (comma-separated); `sim_args` and `worker_args` are added
    to the simulator's and the worker's command lines."""
    with (
        data_servers(database_url, redis_url) as servers,
        tempfile.TemporaryDirectory(prefix="inferq-cache-bench-") as scratch,
    ):
        logs = Path(scratch)
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
        children: list[Child] = []
        try:
            sim_url = f"http://127.0.0.1:{free_port()}"
            sim_port = sim_url.rsplit(":", 1)[1]
            sim = Child.spawn("sim", ["sim", "--port", sim_port, *sim_args], env, logs / "s")
            children.append(sim)
            wait_http(f"{sim_url}/health", sim)
            models = logs / "models.toml"
            text = models_text or '[models.sim]\nbackend = "tgi"\nurl = "{sim}"\n'
            models.write_text(text.replace("{sim}", sim_url))
            key = "iq_bench_" + secrets.token_urlsafe(24)
            env |= {
                "INFERQ_DATABASE_URL": servers.database_url,
                "INFERQ_REDIS_URL": servers.redis_url,
                "INFERQ_MODELS_FILE": str(models),
                "INFERQ_BOOTSTRAP_KEY": key,
                "INFERQ_QUEUE_PREFIX": f"inferq.bench.{secrets.token_hex(4)}",
                "INFERQ_LOG_LEVEL": "WARNING",
            }
            port = free_port()
            api = Child.spawn("api", ["api", "--port", str(port)], env, logs / "api.log")
            children.append(api)
            worker = Child.spawn(
                "worker", ["worker", "--models", worker_models, *worker_args], env, logs / "w.log"
            )
            children.append(worker)
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/readyz", api)
            yield url, key, sim_url
        finally:
            stop_all(children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=100, help="hits per client")
    args = parser.parse_args()
    with platform(args.database_url, args.redis_url) as (url, key, sim_url):
        result = asyncio.run(measure(url, key, args.clients, args.rounds))
        backend_calls = httpx.get(f"{sim_url}/sim/state", timeout=5).json()["total_requests"]
    result["backend_calls"] = backend_calls
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
