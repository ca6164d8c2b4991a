"""`python -m bench.job_path SIM_URL`: what a job costs the worker apart from Celery, in this
process: the claim, the `status` write, the stream on the process's loop, the finish and the
closing write, as `workers.generate.run_job` does them for a delivery.

`--jobs` queued jobs are put in a fresh database (migrated, dropped afterwards; Postgres and
Redis as `inferq bench` takes them, embedded ones without the URLs), then `--threads`
threads run them, each job once, on one `WorkerContext`; one JSON line a run: CPU seconds of
this process (every thread: the jobs', the stream loop's, the lease keeper's) over the jobs.
Start the simulator with the latencies to measure: `inferq sim --ttft-ms 0 --itl-ms 0` puts
the job's own work alone in the figure, `--ttft-ms 50 --itl-ms 20` overlaps the streams as a
busy worker's do.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import psycopg
from psycopg.types.json import Jsonb

from bench.cluster import ModelEntry
from bench.servers import data_servers, libpq_url
from inferq.collector import quiet_collector
from inferq.settings import Settings
from workers.context import WorkerContext
from workers.generate import run_job

MODEL = "job-path"
WARM_JOBS = 20  # run first, not counted: the pools' connections, the loop's first streams


def _queue(database_url: str, count: int, tokens: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.cursor().executemany(
            "INSERT INTO jobs (id, tenant, requested_model, model, status, priority, input,"
            " params, metadata) VALUES (%s, 'bench', %s, %s, 'queued', 'normal', %s, %s, '{}')",
            [
                (
                    job_id,
                    MODEL,
                    MODEL,
                    Jsonb({"prompt": f"job path {i}"}),
                    Jsonb({"max_tokens": tokens}),
                )
                for i, job_id in enumerate(ids)
            ],
        )
    return ids


def _succeeded(database_url: str, ids: list[str]) -> int:
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM jobs WHERE status = 'succeeded' AND id = ANY(%s::uuid[])", [ids]
        ).fetchone()
    return int(row[0]) if row else 0


def _run(settings: Settings, jobs: int, threads: int, tokens: int) -> dict[str, object]:
    ids = _queue(settings.database_url, WARM_JOBS + jobs, tokens)
    ctx = WorkerContext.create(settings, threads)
    ctx.start(threads)
    quiet_collector()  # as the worker does once started
    try:
        for job_id in ids[:WARM_JOBS]:
            run_job(ctx, job_id)
        started, cpu = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda job_id: run_job(ctx, job_id), ids[WARM_JOBS:]))
        cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - started
    finally:
        ctx.close()
    return {
        "jobs": jobs,
        "threads": threads,
        "tokens": tokens,
        "succeeded": _succeeded(settings.database_url, ids[WARM_JOBS:]),
        "cpu_s": round(cpu_s, 3),
        "wall_s": round(wall_s, 2),
        "cpu_ms_per_job": round(cpu_s / jobs * 1000, 3),
    }


@click.command()
@click.argument("sim_url")
@click.option("--database-url", default=None, help="Postgres admin URL (else an embedded one)")
@click.option("--redis-url", default=None, help="Redis URL (else an embedded one)")
@click.option("--jobs", default=1000, show_default=True)
@click.option("--threads", default=64, show_default=True)
@click.option("--tokens", default=4, show_default=True, help="each job's max_tokens")
@click.option("--repeat", default=2, show_default=True)
def main(
    sim_url: str,
    database_url: str | None,
    redis_url: str | None,
    jobs: int,
    threads: int,
    tokens: int,
    repeat: int,
) -> None:
    with data_servers(database_url, redis_url) as servers, tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models.toml"
        models.write_text(ModelEntry(MODEL, sim_url, MODEL, tokens).toml())
        settings = Settings(
            database_url=servers.database_url,
            redis_url=servers.redis_url,
            models_file=models,
            log_level="WARNING",
        )
        for _ in range(repeat):
            click.echo(json.dumps(_run(settings, jobs, threads, tokens)))


if __name__ == "__main__":
    main()
