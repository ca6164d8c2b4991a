"""Phase 5: one tenant floods a queue, then another submits one job; how long does it wait?"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass

import httpx
import psycopg

from bench.cluster import Cluster, ModelEntry
from bench.config import FairnessConfig
from bench.servers import libpq_url
from inferq.models import TERMINAL_STATUSES
from inferq.processes import Child, wait_http

FINISH_TIMEOUT_S = 600.0
FINISHED_SQL = "SELECT count(*) FROM jobs WHERE id = ANY(%s::uuid[]) AND status = ANY(%s)"
# Seconds in the queue (created → started) and running (started → finished), per job.
TIMES_SQL = """
SELECT id::text, extract(epoch FROM started_at - created_at),
       extract(epoch FROM finished_at - started_at)
FROM jobs WHERE id = ANY(%s::uuid[]) AND status = 'succeeded'
"""

NOTE = (
    "Tenant A submits flood_jobs interactive jobs at once to a worker with worker_slots threads"
    " and its own simulator; then tenant B submits one. Waits are started_at - created_at"
    " from the jobs table; without fair share B waits about as long as A's last job."
)


@dataclass(frozen=True)
class FairnessResult:
    model: str
    note: str
    flood_jobs: int
    worker_slots: int
    job_s: float  # median run time of one job (started → finished)
    light_wait_s: float  # tenant B's one job
    flood_wait_p50_s: float
    flood_wait_max_s: float  # A's last job: the backlog B would otherwise wait behind
    light_vs_backlog: float  # light_wait_s / flood_wait_max_s


@dataclass(frozen=True)
class FairnessTarget:
    cluster: Cluster
    api_url: str
    model: str


def _start_worker(target: FairnessTarget, config: FairnessConfig) -> list[Child]:
    cluster = target.cluster
    sim = cluster.start_sim("sim-fairness", config.sim)
    entry = ModelEntry(target.model, sim.url, cluster.queue(target.model), config.sim.output_tokens)
    models = cluster.models_file("fairness", [entry])
    worker = cluster.start_worker("fairness", [target.model], config.worker_slots, models)
    wait_http(f"{sim.url}/health", sim.child)
    cluster.wait_workers(["fairness"], [worker])
    return [sim.child, worker]


async def _new_key(http: httpx.AsyncClient, tenant: str) -> str:
    response = await http.post("/v1/admin/keys", json={"name": tenant, "tenant": tenant})
    response.raise_for_status()
    return str(response.json()["secret"])


async def _submit(http: httpx.AsyncClient, key: str, model: str, tokens: int, i: int) -> str:
    body = {"model": model, "prompt": f"fair {i}", "max_tokens": tokens, "seed": i, "cache": False}
    response = await http.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()
    return str(response.json()["id"])


async def _flood_then_one(target: FairnessTarget, config: FairnessConfig) -> tuple[list[str], str]:
    """Tenant A's flood (all at once), then tenant B's one job once A's are all accepted."""
    admin = {"Authorization": f"Bearer {target.cluster.api_key}"}
    limits = httpx.Limits(max_connections=config.flood_jobs + 1)
    run = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(
        base_url=target.api_url, headers=admin, timeout=60, limits=limits
    ) as http:
        heavy, light = await _new_key(http, f"flood-{run}"), await _new_key(http, f"light-{run}")
        tokens = config.sim.output_tokens
        flood = await asyncio.gather(
            *(_submit(http, heavy, target.model, tokens, i) for i in range(config.flood_jobs))
        )
        one = await _submit(http, light, target.model, tokens, config.flood_jobs)
    return list(flood), one


def _wait_finished(conn: psycopg.Connection, ids: list[str]) -> None:
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    while True:
        row = conn.execute(FINISHED_SQL, (ids, list(TERMINAL_STATUSES))).fetchone()
        if row and int(row[0]) == len(ids):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"fairness: jobs unfinished after {FINISH_TIMEOUT_S}s")
        time.sleep(0.2)


def _result(
    config: FairnessConfig, rows: list[tuple[str, float, float]], one: str
) -> FairnessResult:
    waits = {job: float(wait) for job, wait, _ in rows}
    light = waits.pop(one)
    flood = sorted(waits.values())
    return FairnessResult(
        model="fairness",
        note=NOTE,
        flood_jobs=config.flood_jobs,
        worker_slots=config.worker_slots,
        job_s=round(statistics.median(float(run) for _, _, run in rows), 3),
        light_wait_s=round(light, 3),
        flood_wait_p50_s=round(statistics.median(flood), 3),
        flood_wait_max_s=round(flood[-1], 3),
        light_vs_backlog=round(light / flood[-1], 4) if flood[-1] else float("nan"),
    )


def run(target: FairnessTarget, config: FairnessConfig) -> FairnessResult:
    children = _start_worker(target, config)
    try:
        flood, one = asyncio.run(_flood_then_one(target, config))
        with psycopg.connect(libpq_url(target.cluster.servers.database_url)) as conn:
            conn.autocommit = True
            _wait_finished(conn, [*flood, one])
            rows = conn.execute(TIMES_SQL, ([*flood, one],)).fetchall()
    finally:
        target.cluster.stop(children)
    if len(rows) != len(flood) + 1:
        raise RuntimeError(f"fairness: {len(flood) + 1 - len(rows)} jobs did not succeed")
    return _result(config, [(r[0], float(r[1]), float(r[2])) for r in rows], one)
