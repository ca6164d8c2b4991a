"""The `inferq` command: each process by module path, plus keys, submit and `up`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from inferq.registry import Registry
from inferq.settings import get_settings


def _exec_celery(args: list[str]) -> None:
    """Replace this process with Celery on the workers' app (started by module path)."""
    argv = [sys.executable, "-m", "celery", "-A", "workers.app:app", *args]
    os.execv(sys.executable, argv)


@click.group()
def main() -> None:
    """inferq: queue-backed asynchronous LLM inference."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--workers", default=1, show_default=True, help="uvicorn worker processes")
def api(host: str, port: int, workers: int) -> None:
    """Serve the HTTP API."""
    import uvicorn

    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


@main.command()
@click.option("--models", default="", help="comma-separated model names (default: all)")
@click.option("--concurrency", default=16, show_default=True, help="generation threads")
@click.option("--name", default=None, help="Celery node name")
def worker(models: str, concurrency: int, name: str | None) -> None:
    """Run a Celery worker (threads pool) for the models' queues."""
    registry = Registry.load(get_settings().models_file)
    names = [m for m in models.split(",") if m] or registry.names()
    unknown = [m for m in names if registry.get(m) is None]
    if unknown:
        raise click.BadParameter(
            f"not in the models file: {', '.join(unknown)}", param_hint="--models"
        )
    queues = ",".join(registry.get(m).queue for m in names)  # type: ignore[union-attr]
    args = [
        "worker",
        "-P",
        "threads",
        "-c",
        str(concurrency),
        "-Q",
        queues,
        "-E",
        "--without-mingle",
        "--loglevel",
        "WARNING",
    ]
    if name:
        args += ["-n", name]
    _exec_celery(args)


@main.command()
@click.option("--schedule", default=None, help="beat schedule file")
def beat(schedule: str | None) -> None:
    """Run the scheduler (and the sweeper)."""
    args = ["beat", "--loglevel", "WARNING"]
    if schedule:
        args += ["--schedule", schedule]
    _exec_celery(args)


@main.command()
@click.option("--port", default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True)
def flower(port: int, address: str) -> None:
    """Run Flower (queue health) behind basic auth."""
    auth = get_settings().flower_basic_auth.get_secret_value()
    _exec_celery(["flower", f"--port={port}", f"--address={address}", f"--basic-auth={auth}"])


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8081, show_default=True)
@click.option("--ttft-ms", default=50.0, show_default=True)
@click.option("--itl-ms", default=20.0, show_default=True)
@click.option("--max-concurrent-requests", default=128, show_default=True)
@click.option("--fixed-output-tokens", default=None, type=int)
def sim(
    host: str,
    port: int,
    ttft_ms: float,
    itl_ms: float,
    max_concurrent_requests: int,
    fixed_output_tokens: int | None,
) -> None:
    """Serve the TGI-protocol simulator."""
    from inferq.sim import SimConfig, serve

    config = SimConfig(
        ttft_ms=ttft_ms,
        itl_ms=itl_ms,
        max_concurrent_requests=max_concurrent_requests,
        fixed_output_tokens=fixed_output_tokens,
    )
    serve(config, host=host, port=port)


@main.command()
def migrate() -> None:
    """Apply database migrations (alembic upgrade head)."""
    from inferq.migrate import upgrade

    upgrade(get_settings().database_url)
    click.echo("database is at the latest migration")


@main.group()
def keys() -> None:
    """Manage API keys."""


@keys.command("create")
@click.argument("name")
@click.option("--tenant", default="default", show_default=True)
@click.option("--admin", is_flag=True)
def keys_create(name: str, tenant: str, admin: bool) -> None:
    """Create a key and print its secret (shown this once)."""
    from inferq.admin import create_key

    secret = create_key(get_settings().database_url, name, tenant, admin)
    click.echo(secret)


@main.command()
@click.argument("prompt")
@click.option("--model", default="sim", show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--stream", is_flag=True, help="print tokens as they arrive")
@click.option("--url", envvar="INFERQ_API_URL", default="http://127.0.0.1:8000", show_default=True)
@click.option("--key", envvar="INFERQ_API_KEY", required=True, help="API key (INFERQ_API_KEY)")
def submit(prompt: str, model: str, max_tokens: int, stream: bool, url: str, key: str) -> None:
    """Submit a prompt and print the output."""
    from inferq.client import submit_and_print

    sys.exit(submit_and_print(url, key, prompt, model, max_tokens, stream))


@main.command()
@click.option("--port", default=8000, show_default=True, help="the API's port")
@click.option("--models", "models_file", type=click.Path(exists=True, path_type=Path))
@click.option("--data-dir", default=".inferq", show_default=True, type=click.Path(path_type=Path))
@click.option("--concurrency", default=32, show_default=True)
@click.option("--sim-port", default=8081, show_default=True)
@click.option("--flower-port", default=5555, show_default=True)
def up(
    port: int,
    models_file: Path | None,
    data_dir: Path,
    concurrency: int,
    sim_port: int,
    flower_port: int,
) -> None:
    """Run everything on embedded Postgres and Redis, with the simulator."""
    from inferq.standalone import Ports, run_standalone

    ports = Ports(api=port, sim=sim_port, flower=flower_port)
    sys.exit(run_standalone(ports, models_file, data_dir, concurrency))


@main.command()
@click.option(
    "--phases",
    default="stream,submit,fanout,scale",
    show_default=True,
    help="comma-separated phases to run",
)
@click.option("--smoke", is_flag=True, help="tiny sizes that finish in seconds")
@click.option(
    "--out",
    "out_dir",
    default="bench-results",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option(
    "--database-url",
    envvar="INFERQ_BENCH_DATABASE_URL",
    help="Postgres admin URL; the run creates (and drops) its own database on that server "
    "[env INFERQ_BENCH_DATABASE_URL; default: embedded]",
)
@click.option(
    "--redis-url",
    envvar="INFERQ_BENCH_REDIS_URL",
    help="Redis URL; nothing is flushed, the run's queues carry its id "
    "[env INFERQ_BENCH_REDIS_URL; default: embedded]",
)
def bench(
    phases: str, smoke: bool, out_dir: Path, database_url: str | None, redis_url: str | None
) -> None:
    """Measure the platform against its backend: stream, submit, fan-out, scale."""
    from inferq.bench.command import run_command

    sys.exit(run_command(phases, smoke, out_dir, database_url, redis_url))
