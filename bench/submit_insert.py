"""`python -m bench.submit_insert`: what a submit's INSERT costs the API, alone.

The API's own engine (`inferq.db.make_async_engine`, in autocommit as the API runs it) and
submit batcher (`api.jobs.batcher.SubmitBatcher`), its enqueue a no-op, in this process: one
client submits `--submits` jobs one after the other, so each batch holds one job and takes a
pooled connection of its own, as a lone submit does. One JSON line a run: the latency of
`submit()` (p50, p95) and this process's CPU a submit (user and system; Postgres's is not
counted). Postgres as `inferq bench` takes it (a fresh database on the given server, dropped
afterwards; an embedded server without the URL).
"""

from __future__ import annotations

import json
import time
from typing import Any

import click
import uvloop

from api.jobs.batcher import SubmitBatcher
from bench.servers import fresh_database_or_embedded
from inferq.db import make_async_engine, uuid7
from inferq.models import Job

WARM_SUBMITS = 50  # not counted: the pool's connections, the statement's first preparation


def _row(index: int) -> dict[str, Any]:
    return {
        "id": uuid7(),
        "tenant": "bench",
        "api_key_id": None,
        "requested_model": "insert-path",
        "model": "insert-path",
        "status": "queued",
        "priority": "normal",
        "input": {"prompt": f"insert path {index}"},
        "params": {"max_tokens": 1},
        "webhook": None,
        "metadata_": {},
        "deadline_at": None,
        "request_hash": None,
    }


async def _enqueued(jobs: list[Job]) -> None:
    del jobs  # no broker: only the INSERT is timed


async def _measure(database_url: str, submits: int, repeat: int) -> None:
    engine = make_async_engine(database_url, pool_size=4)
    batcher = SubmitBatcher(engine.execution_options(isolation_level="AUTOCOMMIT"), _enqueued)
    batcher.start()
    try:
        for index in range(WARM_SUBMITS):
            await batcher.submit(_row(index))
        for _ in range(repeat):
            latencies: list[float] = []
            cpu = time.process_time()
            for index in range(submits):
                started = time.perf_counter()
                await batcher.submit(_row(index))
                latencies.append(time.perf_counter() - started)
            cpu_s = time.process_time() - cpu
            latencies.sort()
            figures = {
                "submits": submits,
                "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
                "p95_ms": round(latencies[int(len(latencies) * 0.95)] * 1000, 3),
                "cpu_us_per_submit": round(cpu_s / submits * 1e6, 1),
            }
            click.echo(json.dumps(figures))
    finally:
        await batcher.close()
        await engine.dispose()


@click.command()
@click.option("--database-url", default=None, help="Postgres admin URL (else an embedded one)")
@click.option("--submits", default=2000, show_default=True)
@click.option("--repeat", default=2, show_default=True)
def main(database_url: str | None, submits: int, repeat: int) -> None:
    with fresh_database_or_embedded(database_url) as url:
        uvloop.run(_measure(url, submits, repeat))


if __name__ == "__main__":
    main()
