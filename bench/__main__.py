"""`python -m bench`, which `inferq bench` runs: parse the options, then run the benchmark."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bench.command import (
    RelayOptions,
    database_url_option,
    out_option,
    redis_url_option,
    run_command,
    worker_processes_option,
    worker_streams_option,
)


@click.command()
@click.option(
    "--phases",
    default="stream,submit,fanout,scale,relay",
    show_default=True,
    help="comma-separated phases to run",
)
@click.option("--smoke", is_flag=True, help="tiny sizes that finish in seconds")
@worker_processes_option("--relay-processes")
@click.option(
    "--relay-output-tokens",
    type=click.IntRange(min=2),
    default=None,
    help="tokens of every reply in the relay phase [default: 64]",
)
@worker_streams_option("--relay-streams")
@out_option("bench-results")
@database_url_option
@redis_url_option
def main(
    phases: str,
    smoke: bool,
    relay_processes: int | None,
    relay_output_tokens: int | None,
    relay_streams: str | None,
    out_dir: Path,
    database_url: str | None,
    redis_url: str | None,
) -> None:
    """Measure the platform against its backend: stream, submit, fan-out, scale, relay."""
    relay = RelayOptions(relay_processes, relay_output_tokens, relay_streams)
    sys.exit(run_command(phases, smoke, out_dir, database_url, redis_url, relay))


if __name__ == "__main__":
    main(prog_name="inferq bench")
