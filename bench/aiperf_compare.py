"""`python -m bench.aiperf_compare`: NVIDIA's aiperf load generator, straight at the simulator
and through the platform, so that the relay phase's direct-vs-platform figures have a second
opinion from a client the project did not write.

The platform is the relay phase's (bench/relay.py): one simulator (fixed time to first token and
inter-token latency, every reply exactly `--output-tokens` long), one API and one worker, on the
given Postgres and Redis or on embedded ones. At each concurrency aiperf runs closed-loop
streaming chat completions, first straight to the simulator's /v1/chat/completions, then to the
platform's with the run's API key; one table compares its JSON exports.

aiperf runs from a virtualenv of its own (`--aiperf`): its dependencies are not the project's.
It needs a tokenizer to write its prompts, and its built-in one downloads a vocabulary at run
time, so the run writes one that splits on whitespace over the simulator's words: it counts
tokens as the simulator does. The requests carry no `ignore_eos`: the platform refuses
parameters it does not know, and the simulator's fixed output length already returns exactly
`--output-tokens` tokens (token counts are the servers' own `usage`). They sample
(`temperature` 1), so that the platform's response cache never answers one of them.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from bench import relay
from bench.cluster import Cluster
from bench.command import (
    TABLE_WIDTH,
    database_url_option,
    out_option,
    redis_url_option,
    worker_processes_option,
    worker_streams_option,
)
from bench.config import RelayConfig
from bench.runner import raise_nofile_limit
from bench.servers import data_servers
from bench.stats import ratio
from sim.model import VOCABULARY

EXPORT_FILE = "profile_export_aiperf.json"  # aiperf's JSON summary, in its artifact directory
AIPERF_TIMEOUT_S = 1800.0
REQUEST_TIMEOUT_S = 120  # one stream; a stuck one fails instead of holding the run
UNKNOWN_WORD = "[UNK]"


@dataclass(frozen=True)
class Load:
    """What every aiperf run of the comparison shares."""

    aiperf: str
    model: str
    tokenizer: Path
    input_tokens: int
    output_tokens: int
    rounds: int  # requests per client: aiperf's request count is concurrency * rounds
    out_dir: Path


@dataclass(frozen=True)
class AiperfRun:
    """The figures of one aiperf JSON export (ms, tokens/s)."""

    requests: int
    errors: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float

    @classmethod
    def of(cls, export: dict[str, dict[str, float]]) -> AiperfRun:
        def stat(tag: str, name: str) -> float:
            value = (export.get(tag) or {}).get(name)
            return math.nan if value is None else float(value)

        # aiperf leaves error_request_count out when no request failed.
        errors = stat("error_request_count", "avg")
        return cls(
            requests=int(stat("request_count", "avg")),
            errors=0 if math.isnan(errors) else int(errors),
            tokens_per_s=stat("output_token_throughput", "avg"),
            ttft_p50_ms=stat("time_to_first_token", "p50"),
            ttft_p99_ms=stat("time_to_first_token", "p99"),
            itl_p50_ms=stat("inter_token_latency", "p50"),
        )


@dataclass(frozen=True)
class Level:
    concurrency: int
    direct: AiperfRun
    platform: AiperfRun

    @property
    def tokens_per_s_ratio(self) -> float:
        return ratio(self.platform.tokens_per_s, self.direct.tokens_per_s)


def write_tokenizer(directory: Path) -> Path:
    """A Hugging Face tokenizer of the simulator's words, split on whitespace, as a local path
    aiperf loads without a network: its prompts are simulator words, counted as it counts them."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {UNKNOWN_WORD: 0, **{word: i for i, word in enumerate(VOCABULARY, start=1)}}
    unknown = {"id": 0, "content": UNKNOWN_WORD, "special": True, "normalized": False}
    unknown |= {"single_word": False, "lstrip": False, "rstrip": False}
    tokenizer = {
        "version": "1.0",
        "added_tokens": [unknown],
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNKNOWN_WORD},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": UNKNOWN_WORD}
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def aiperf_command(
    load: Load, url: str, api_key: str | None, concurrency: int, artifacts: Path
) -> list[str]:
    """`aiperf profile`: streaming chat, a closed loop of `concurrency` clients, one warm-up
    request each first; a summary export only, and no scraping of /metrics or of GPUs."""
    command = [load.aiperf, "profile", "--model", load.model, "--tokenizer", str(load.tokenizer)]
    command += ["--url", url, "--endpoint-type", "chat", "--streaming"]
    # `max_tokens`: the simulator reads it (not `max_completion_tokens`), the platform both.
    command += ["--use-legacy-max-tokens", "--use-server-token-count"]
    # Sampling, as chat clients do by default: without it a request to a `tgi` model is greedy,
    # so deterministic, and the platform would answer aiperf's repeated prompts from its cache.
    command += ["--extra-inputs", "temperature:1.0"]
    command += ["--osl", str(load.output_tokens), "--osl-stddev", "0"]
    command += ["--isl", str(load.input_tokens), "--isl-stddev", "0", "--prompt-corpus", "random"]
    command += ["--concurrency", str(concurrency)]
    command += ["--request-count", str(concurrency * load.rounds)]
    command += ["--warmup-request-count", str(concurrency)]
    command += ["--request-timeout-seconds", str(REQUEST_TIMEOUT_S), "--random-seed", "0"]
    command += ["--output-artifact-dir", str(artifacts), "--export-level", "summary"]
    command += ["--ui", "none", "--no-server-metrics", "--no-gpu-telemetry"]
    if api_key is not None:
        command += ["--api-key", api_key]  # sent as Authorization: Bearer <key>
    return command


def run_aiperf(load: Load, name: str, url: str, api_key: str | None, concurrency: int) -> AiperfRun:
    """One aiperf run into a fresh artifact directory (no stale export can be read back)."""
    artifacts = load.out_dir / f"c{concurrency}-{name}"
    shutil.rmtree(artifacts, ignore_errors=True)
    log = load.out_dir / "logs" / f"aiperf-c{concurrency}-{name}.log"
    with log.open("w") as output:
        command = aiperf_command(load, url, api_key, concurrency, artifacts)
        done = subprocess.run(
            command, stdout=output, stderr=subprocess.STDOUT, timeout=AIPERF_TIMEOUT_S
        )
    if done.returncode != 0:
        raise click.ClickException(f"aiperf exited with {done.returncode}: see {log}")
    return AiperfRun.of(json.loads((artifacts / EXPORT_FILE).read_text()))


def compare(
    load: Load,
    config: RelayConfig,
    servers: tuple[str | None, str | None],
    console: Console,
) -> list[Level]:
    """The relay phase's platform, then aiperf direct and through it at each concurrency."""
    levels = []
    with data_servers(*servers) as data:
        cluster = Cluster(data, load.out_dir / "logs")
        try:
            console.print("starting the simulator, the API and the worker")
            platform, _ = relay.start(cluster, config)
            sim_url = platform.sims[config.levels[0][1]].url
            for concurrency, _ in config.levels:
                console.print(f"aiperf C={concurrency}: direct")
                direct = run_aiperf(load, "direct", sim_url, None, concurrency)
                console.print(f"aiperf C={concurrency}: platform")
                through = run_aiperf(
                    load, "platform", platform.api_url, cluster.api_key, concurrency
                )
                levels.append(Level(concurrency, direct, through))
        finally:
            cluster.close()
    return levels


def _pair(direct: float, platform: float) -> str:
    return f"{direct:.1f} → {platform:.1f}"


def print_table(levels: list[Level], title: str, console: Console) -> None:
    table = Table(title=title)
    columns = ("C", "direct tok/s", "platform tok/s", "ratio", "TTFT p50 ms", "TTFT p99 ms")
    for column in (*columns, "ITL p50 ms", "errors/requests"):
        table.add_column(column, justify="right")
    for level in levels:
        direct, through = level.direct, level.platform
        table.add_row(
            str(level.concurrency),
            f"{direct.tokens_per_s:.0f}",
            f"{through.tokens_per_s:.0f}",
            f"{level.tokens_per_s_ratio:.3f}",
            _pair(direct.ttft_p50_ms, through.ttft_p50_ms),
            _pair(direct.ttft_p99_ms, through.ttft_p99_ms),
            _pair(direct.itl_p50_ms, through.itl_p50_ms),
            f"{direct.errors}/{direct.requests} → {through.errors}/{through.requests}",
        )
    console.print(table)


def _concurrency(ctx: click.Context, param: click.Parameter, text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if not levels or min(levels) < 1:
        raise click.BadParameter("give positive client counts, e.g. 16,64")
    return levels


@click.command()
@click.option(
    "--aiperf",
    default="aiperf",
    show_default=True,
    help="the aiperf executable, from a virtualenv of its own "
    "(python3 -m venv DIR && DIR/bin/pip install aiperf==0.13.0; then DIR/bin/aiperf)",
)
@click.option(
    "--concurrency",
    default="16,64",
    show_default=True,
    callback=_concurrency,
    help="comma-separated client counts, one level each",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="requests per client at each level and path",
)
@click.option(
    "--output-tokens",
    type=click.IntRange(min=2),
    default=64,
    show_default=True,
    help="tokens of every reply (the simulator's fixed output length, and max_tokens)",
)
@click.option(
    "--input-tokens",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="words of every synthetic prompt",
)
@click.option(
    "--ttft-ms",
    type=float,
    default=50.0,
    show_default=True,
    help="the simulator's time to first token",
)
@click.option(
    "--itl-ms",
    type=float,
    default=10.0,
    show_default=True,
    help="the simulator's inter-token latency",
)
@worker_processes_option("--worker-processes")
@worker_streams_option("--worker-streams")
@out_option("bench-results/aiperf")
@database_url_option
@redis_url_option
def main(
    aiperf: str,
    concurrency: tuple[int, ...],
    rounds: int,
    output_tokens: int,
    input_tokens: int,
    ttft_ms: float,
    itl_ms: float,
    worker_processes: int | None,
    worker_streams: str | None,
    out_dir: Path,
    database_url: str | None,
    redis_url: str | None,
) -> None:
    """aiperf streaming chat straight at the simulator and through the platform, compared."""
    executable = shutil.which(aiperf)
    if executable is None:
        raise click.UsageError(f"no aiperf at {aiperf!r}: install it and pass --aiperf")
    # SIGTERM unwinds like Ctrl-C, so that the run's processes and database are cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise_nofile_limit()
    logs = out_dir / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    # The relay phase's platform; its request counts are aiperf's business here.
    config = RelayConfig(
        levels=tuple((clients, itl_ms) for clients in concurrency),
        ttft_ms=ttft_ms,
        output_tokens=output_tokens,
        min_requests=0,
        min_rounds=1,
        max_rounds=1,
        burst=0,
        processes=worker_processes,
        streams=worker_streams,
    )
    tokenizer = write_tokenizer(out_dir / "tokenizer")
    load = Load(
        executable, relay.model_of(itl_ms), tokenizer, input_tokens, output_tokens, rounds, out_dir
    )
    console = Console()
    if not console.is_terminal:
        console.width = TABLE_WIDTH  # a log file has room for the whole table
    levels = compare(load, config, (database_url, redis_url), console)
    figures = [
        {**asdict(level), "tokens_per_s_ratio": level.tokens_per_s_ratio} for level in levels
    ]
    (out_dir / "compare.json").write_text(json.dumps(figures, indent=2))
    title = (
        f"aiperf streaming chat, direct → platform: {output_tokens} output tokens, simulator"
        f" TTFT {ttft_ms:g} ms, ITL {itl_ms:g} ms, {rounds} requests per client"
    )
    print_table(levels, title, console)
    console.print(f"aiperf exports in {out_dir}/c*-direct, c*-platform; logs in {logs}")


if __name__ == "__main__":
    main(prog_name="python -m bench.aiperf_compare")
