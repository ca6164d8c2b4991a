"""Phase 2: the front door alone; jobs go to a queue that no worker consumes."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httptools

from inferq.bench.config import SubmitConfig
from inferq.bench.stats import Percentiles
from inferq.bench.wire import KeepAlive

Tick = Callable[[], None]
WARMUP_JOBS = 20
MODEL = "void"  # a model whose queue no worker consumes


@dataclass(frozen=True)
class SubmitLevel:
    api_processes: int
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
    connections: list[KeepAlive], api_processes: int, concurrency: int, jobs: int, tick: Tick
) -> SubmitLevel:
    """`concurrency` closed-loop submitters, a connection each, share `jobs` submissions."""
    remaining = iter(range(jobs))
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def submitter(http: KeepAlive) -> None:
        for index in remaining:
            body = {"model": MODEL, "prompt": f"submit {index}", "max_tokens": 16, "seed": index}
            payload = json.dumps(body).encode()
            started = time.perf_counter()
            try:
                status, _ = await http.post_json("/v1/jobs", payload)
            except (OSError, httptools.HttpParserError) as exc:
                errors[type(exc).__name__] += 1
            else:
                if status == 202:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors[f"HTTP {status}"] += 1
            tick()

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(submitter(connections[i]) for i in range(concurrency)))
    wall = time.perf_counter() - start
    return SubmitLevel(
        api_processes=api_processes,
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
    api_url: str, api_key: str, config: SubmitConfig, api_processes: int, tick: Tick
) -> list[SubmitLevel]:
    """Each level after the other, on the same kept-alive connections, after a warm-up."""
    headers = {"Authorization": f"Bearer {api_key}"}
    widest = max(config.concurrency)
    results: list[SubmitLevel] = []
    with KeepAlive.many(api_url, headers, widest) as connections:
        await run_level(connections, api_processes, min(4, widest), WARMUP_JOBS, lambda: None)
        for concurrency in config.concurrency:
            jobs = config.jobs_per_level
            results.append(await run_level(connections, api_processes, concurrency, jobs, tick))
    return results
