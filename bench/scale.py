"""Phase 4: 1..k workers, each with its own capacity-limited simulator, on one shared queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import httpx
import psycopg
import uvloop

from bench.clients import ClientShards
from bench.cluster import Cluster, ModelEntry
from bench.config import ScaleConfig
from bench.servers import libpq_url
from bench.stats import ratio
from inferq.models import TERMINAL_STATUSES
from inferq.processes import Child, wait_http

Tick = Callable[[], None]
FINISH_TIMEOUT_S = 600.0

FINISHED_SQL = "SELECT count(*) FROM jobs WHERE id = ANY(%s::uuid[]) AND status = ANY(%s)"
SUMMARY_SQL = """
SELECT count(*) FILTER (WHERE status = 'succeeded'),
       extract(epoch FROM max(finished_at) - min(created_at)),
       coalesce(sum(output_tokens), 0),
       count(DISTINCT worker)
FROM jobs WHERE id = ANY(%s::uuid[])
"""


@dataclass(frozen=True)
class ScaleLevel:
    workers: int
    jobs: int
    succeeded: int
    span_s: float  # first submit (created_at) to last finish (finished_at), from the jobs table
    jobs_per_s: float
    tokens_per_s: float
    workers_used: int
    efficiency: float  # jobs/s / (workers * jobs/s with one worker)


NOTE = (
    "Each worker (threads pool) has its own simulator, capacity-limited like a GPU server;"
    " all consume one queue. A burst of jobs_per_worker * workers jobs is submitted at once;"
    " throughput runs from the first created_at to the last finished_at in the jobs table."
)


@dataclass(frozen=True)
class ScaleResult:
    model: str
    queue: str
    note: str
    levels: list[ScaleLevel]


@dataclass(frozen=True)
class ScaleTarget:
    cluster: Cluster
    api_url: str
    model: str


def start_workers(target: ScaleTarget, config: ScaleConfig, count: int) -> list[Child]:
    """`count` workers, each pointing the shared model's queue at its own simulator."""
    cluster = target.cluster
    queue = cluster.queue(target.model)
    nodes = [f"scale-{count}-{i}" for i in range(count)]
    sims = [cluster.start_sim(f"sim-{node}", config.sim) for node in nodes]
    workers = []
    for node, sim in zip(nodes, sims, strict=True):
        entry = ModelEntry(target.model, sim.url, queue, config.sim.output_tokens)
        models = cluster.models_file(node, [entry])
        workers.append(
            cluster.start_worker(node, [target.model], config.worker_concurrency, models)
        )
    for sim in sims:
        wait_http(f"{sim.url}/health", sim.child)
    cluster.wait_workers(nodes, workers)
    return [sim.child for sim in sims] + workers


async def _burst(target: ScaleTarget, config: ScaleConfig, jobs: int, tick: Tick) -> list[str]:
    """Submit `jobs` jobs as fast as `config.submitters` concurrent clients can."""
    headers = {"Authorization": f"Bearer {target.cluster.api_key}"}
    ids: list[str] = []
    pending = iter(range(jobs))

    async def submitter(http: httpx.AsyncClient) -> None:
        for index in pending:
            body = {
                "model": target.model,
                "prompt": f"scale job {index}",
                "max_tokens": config.sim.output_tokens,
                "seed": index,
                "cache": False,
            }
            response = await http.post("/v1/jobs", json=body)
            response.raise_for_status()
            ids.append(response.json()["id"])
            tick()

    async with ClientShards(config.submitters, base_url=target.api_url, headers=headers) as shards:
        await asyncio.gather(*(submitter(shards[i]) for i in range(config.submitters)))
    return ids


def _wait_finished(conn: psycopg.Connection, ids: list[str], tick: Tick) -> None:
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    done = 0
    while done < len(ids):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"scale: {len(ids) - done} jobs unfinished after {FINISH_TIMEOUT_S}s"
            )
        time.sleep(0.2)
        row = conn.execute(FINISHED_SQL, (ids, list(TERMINAL_STATUSES))).fetchone()
        finished = int(row[0]) if row else 0
        for _ in range(finished - done):
            tick()
        done = finished


def run_level(target: ScaleTarget, config: ScaleConfig, count: int, tick: Tick) -> ScaleLevel:
    children = start_workers(target, config, count)
    try:
        ids = uvloop.run(_burst(target, config, config.jobs_per_worker * count, tick))
        with psycopg.connect(libpq_url(target.cluster.servers.database_url)) as conn:
            conn.autocommit = True
            _wait_finished(conn, ids, tick)
            row = conn.execute(SUMMARY_SQL, (ids,)).fetchone()
    finally:
        target.cluster.stop(children)
    succeeded, span, tokens, used = row or (0, 0.0, 0, 0)
    span_s = float(span or 0.0)
    return ScaleLevel(
        workers=count,
        jobs=len(ids),
        succeeded=int(succeeded),
        span_s=round(span_s, 3),
        jobs_per_s=ratio(int(succeeded), span_s),
        tokens_per_s=ratio(int(tokens), span_s),
        workers_used=int(used),
        efficiency=1.0,
    )


def with_efficiency(levels: list[ScaleLevel]) -> list[ScaleLevel]:
    """Efficiency against the one-worker level: throughput_k / (k * throughput_1)."""
    base = next((level.jobs_per_s for level in levels if level.workers == 1), None)
    if base is None:
        return levels
    return [replace(lvl, efficiency=ratio(lvl.jobs_per_s, lvl.workers * base)) for lvl in levels]
