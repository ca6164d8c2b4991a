"""`inferq bench`: parse the options, run, say where the results are."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console

from bench.config import BenchConfig, Phase, RelayConfig
from bench.report import CHART_FILE, JSON_FILE
from bench.runner import run_bench

TABLE_WIDTH = 160


def parse_phases(text: str) -> tuple[Phase, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    try:
        chosen = {Phase(name) for name in names}
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--phases") from None
    return tuple(phase for phase in Phase if phase in chosen)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# The servers a run uses, shared by `inferq bench` and `python -m bench.aiperf_compare`.
database_url_option = click.option(
    "--database-url",
    envvar="INFERQ_BENCH_DATABASE_URL",
    help="Postgres admin URL; the run creates (and drops) its own database on that server "
    "[env INFERQ_BENCH_DATABASE_URL; default: embedded]",
)
redis_url_option = click.option(
    "--redis-url",
    envvar="INFERQ_BENCH_REDIS_URL",
    help="Redis URL; nothing is flushed, the run's queues carry its id "
    "[env INFERQ_BENCH_REDIS_URL; default: embedded]",
)


def out_option(default: str) -> Callable[[Any], Any]:
    """Where a bench command writes its results."""
    return click.option(
        "--out",
        "out_dir",
        default=default,
        show_default=True,
        type=click.Path(file_okay=False, path_type=Path),
    )


def worker_processes_option(flag: str) -> Callable[[Any], Any]:
    """The bench's worker's `--processes`, as `flag`."""
    return click.option(
        flag,
        type=click.IntRange(min=1),
        default=None,
        help="the worker's `inferq worker --processes` [default: the worker's own]",
    )


def worker_streams_option(flag: str) -> Callable[[Any], Any]:
    """How the bench's worker reads its backend streams (INFERQ_WORKER_STREAMS), as `flag`."""
    return click.option(
        flag,
        type=click.Choice(["loop", "threads"]),
        default=None,
        help="how the worker reads its backend streams (INFERQ_WORKER_STREAMS) "
        "[default: the worker's own]",
    )


@dataclass(frozen=True)
class RelayOptions:
    """The relay phase's settings a run may change from the command line (None: as set)."""

    processes: int | None = None
    output_tokens: int | None = None
    streams: str | None = None

    def apply(self, relay: RelayConfig) -> RelayConfig:
        if self.processes is not None:
            relay = replace(relay, processes=self.processes)
        if self.output_tokens is not None:
            relay = replace(relay, output_tokens=self.output_tokens)
        if self.streams is not None:
            relay = replace(relay, streams=self.streams)
        return relay


def run_command(
    phases: str,
    smoke: bool,
    out_dir: Path,
    database_url: str | None,
    redis_url: str | None,
    relay: RelayOptions | None = None,
) -> int:
    config = (BenchConfig.smoke() if smoke else BenchConfig.full()).with_phases(
        parse_phases(phases)
    )
    if relay is not None:
        config = replace(config, relay=relay.apply(config.relay))
    # SIGTERM unwinds like Ctrl-C, so that the run's processes and database are cleaned up.
    signal.signal(signal.SIGTERM, _interrupt)
    console = Console()
    if not console.is_terminal:
        console.width = TABLE_WIDTH  # a log file has room for the whole table
    run_bench(config, out_dir, database_url, redis_url, console)
    console.print(f"results: {out_dir / JSON_FILE}, chart: {out_dir / CHART_FILE}")
    return 0
