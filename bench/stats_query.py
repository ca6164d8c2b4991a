"""Time `GET /v1/stats` through the real API over HTTP, on a database filled by stats_fill.

`python -m bench.stats_query --database-url postgresql://…/inferq_stats --redis-url redis://…/3`

Starts one API process on the database, makes a key of the `bench` tenant (the one that owns
the filled jobs), then asks for the last `--days` days grouped by `--group-by`, `--runs`
times after `--warmup` unmeasured ones, and prints p50/p95 of the answer times.

`--mode rolled` (the default) first rolls up the closed days the rollup lacks, as the beat
task does, so today alone is read live; `--mode live` empties the tenant's rollup first, so
every day is read from the jobs (that is the first answer after a fill, or with no beat).
"""

from __future__ import annotations

import os
import secrets
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import httpx
import psycopg

from bench.servers import libpq_url
from bench.stats import percentile
from bench.stats_fill import TENANT
from inferq.db import make_sync_engine
from inferq.embedded import free_port
from inferq.processes import Child, wait_http
from inferq.stats_rollup import roll_up


def prepare(database_url: str, mode: str, days: int) -> None:
    if mode == "live":
        with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
            conn.execute("DELETE FROM stats_days WHERE tenant = %s", (TENANT,))
        return
    engine = make_sync_engine(database_url, pool_size=1)
    began = time.monotonic()
    rolled = roll_up(engine, days=days + 1)
    engine.dispose()
    click.echo(f"rolled up {rolled} (tenant, day) in {time.monotonic() - began:.1f} s")


def start_api(database_url: str, redis_url: str, bootstrap: str, logs: Path) -> tuple[str, Child]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")},
        "INFERQ_DATABASE_URL": database_url,
        "INFERQ_REDIS_URL": redis_url,
        "INFERQ_BOOTSTRAP_KEY": bootstrap,
        "INFERQ_QUEUE_PREFIX": f"inferq.bench.stats.{secrets.token_hex(4)}",
    }
    child = Child.spawn("api", ["api", "--port", str(port)], env, logs / "api.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz", child)
    return url, child


def tenant_key(url: str, bootstrap: str) -> str:
    response = httpx.post(
        f"{url}/v1/admin/keys",
        json={"name": "stats-bench", "tenant": TENANT},
        headers={"Authorization": f"Bearer {bootstrap}"},
        timeout=30,
    )
    response.raise_for_status()
    return str(response.json()["secret"])


def measure(url: str, key: str, params: dict[str, str], warmup: int, runs: int) -> list[float]:
    times: list[float] = []
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as http:
        for n in range(warmup + runs):
            began = time.perf_counter()
            response = http.get("/v1/stats", params=params)
            elapsed = (time.perf_counter() - began) * 1000
            response.raise_for_status()
            if n == 0:
                rows = response.json()["data"]
                jobs = sum(row["jobs"] for row in rows)
                click.echo(f"{len(rows)} rows over {jobs:,} jobs; first answer {elapsed:.0f} ms")
            if n >= warmup:
                times.append(elapsed)
    return times


@click.command()
@click.option("--database-url", required=True, help="a database filled by bench.stats_fill")
@click.option("--redis-url", required=True, help="Redis for the API (nothing is flushed)")
@click.option("--days", default=30, show_default=True, help="the range: the last DAYS days")
@click.option("--group-by", default="model,day", show_default=True)
@click.option("--runs", default=30, show_default=True)
@click.option("--warmup", default=3, show_default=True)
@click.option("--mode", type=click.Choice(["rolled", "live"]), default="rolled", show_default=True)
def main(
    database_url: str, redis_url: str, days: int, group_by: str, runs: int, warmup: int, mode: str
) -> None:
    """Time /v1/stats over HTTP for the bench tenant (see the module doc)."""
    prepare(database_url, mode, days)
    today = datetime.now(UTC).date()
    params = {
        "from": str(today - timedelta(days=days - 1)),
        "to": str(today),
        "group_by": group_by,
    }
    bootstrap = "iq_bench_" + secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="inferq-stats-bench-") as logs:
        url, api = start_api(database_url, redis_url, bootstrap, Path(logs))
        try:
            times = measure(url, tenant_key(url, bootstrap), params, warmup, runs)
        finally:
            api.stop()
    click.echo(
        f"GET /v1/stats {params} mode={mode}: n={len(times)} "
        f"p50={percentile(times, 50):.0f} ms p95={percentile(times, 95):.0f} ms "
        f"mean={statistics.fmean(times):.0f} ms max={max(times):.0f} ms"
    )


if __name__ == "__main__":
    main(prog_name="python -m bench.stats_query")
