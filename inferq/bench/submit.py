"""Phase 2: the front door alone; jobs go to a queue that no worker consumes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from inferq.bench.clients import ClientShards
from inferq.bench.config import SubmitConfig
from inferq.bench.stats import Percentiles

Tick = Callable[[], None]
WARMUP_JOBS = 20


@dataclass(frozen=True)
class SubmitLevel:
    concurrency: int
    jobs: int
    accepted: int
    errors: dict[str, int]
    wall_s: float
    jobs_per_s: float
    latency_ms: Percentiles
    client_cpu_share: float  # the bench process's CPU / wall: near 1.0, it was the bottleneck


@dataclass(frozen=True)
class SubmitResult:
    model: str
    queue: str
    note: str
    levels: list[SubmitLevel]


async def run_level(
    shards: ClientShards, model: str, concurrency: int, jobs: int, tick: Tick
) -> SubmitLevel:
    """`concurrency` closed-loop submitters share `jobs` submissions."""
    remaining = iter(range(jobs))
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def submitter(http: httpx.AsyncClient) -> None:
        for index in remaining:
            body = {"model": model, "prompt": f"submit {index}", "max_tokens": 16, "seed": index}
            started = time.perf_counter()
            try:
                response = await http.post("/v1/jobs", json=body)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
            else:
                if response.status_code == 202:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors[f"HTTP {response.status_code}"] += 1
            tick()

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(submitter(shards[i]) for i in range(concurrency)))
    wall = time.perf_counter() - start
    return SubmitLevel(
        concurrency=concurrency,
        jobs=jobs,
        accepted=len(latencies),
        errors=dict(errors),
        wall_s=round(wall, 3),
        jobs_per_s=len(latencies) / wall if wall else 0.0,
        latency_ms=Percentiles.of(latencies),
        client_cpu_share=round((time.process_time() - cpu) / wall, 3) if wall else 0.0,
    )


async def run(
    api_url: str, api_key: str, model: str, config: SubmitConfig, tick: Tick
) -> list[SubmitLevel]:
    """Each level after the other, on one connection pool, after a short warm-up."""
    headers = {"Authorization": f"Bearer {api_key}"}
    widest = max(config.concurrency)
    results: list[SubmitLevel] = []
    async with ClientShards(widest, base_url=api_url, headers=headers) as shards:
        await run_level(shards, model, min(4, widest), WARMUP_JOBS, lambda: None)
        for concurrency in config.concurrency:
            results.append(await run_level(shards, model, concurrency, config.jobs_per_level, tick))
    return results
