"""Phase `relay`: does one worker keep up with a fast backend, and what does a token cost it?

The phase starts its own simulators (one per inter-token latency), API and worker (`inferq
worker` with the concurrency of the largest level, its processes as the worker sizes them or
as configured), so that the worker is fresh when it begins:

1. the first burst: a fresh worker is given `burst` streams at once (every client submits
   one job); their times to first token;
2. at each level (clients, inter-token latency), closed loops straight to the simulator,
   then through the platform (as the stream phase runs them), the worker processes' CPU
   over the platform's loop, and a bare reader of the same streams in a process of its own
   (bench/bare_reader.py): tokens relayed per second of worker CPU, against the floor;
3. the warm burst: the same burst again, now that the worker is warm.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import uvloop

from bench import stream
from bench.clients import Request, Timing
from bench.cluster import Cluster, ModelEntry, Sim, cpu_seconds
from bench.config import RelayConfig
from bench.stats import Difference, Percentiles, ratio
from bench.submit import create_keys
from inferq.processes import Child, wait_http
from workers import nodes

Tick = Callable[[], None]
VOID = "relay-void"  # no worker serves it: submits to it warm the API up alone
BARE_READER_TIMEOUT_S = 600.0


def model_of(itl_ms: float) -> str:
    return f"relay-{itl_ms:g}ms"


@dataclass(frozen=True)
class BareReader:
    """bench/bare_reader.py on the same streams as the level's direct loop."""

    tokens: int
    cpu_s: float
    errors: int
    cpu_us_per_token: float


@dataclass(frozen=True)
class RelayLevel:
    clients: int
    itl_ms: float
    requests_per_client: int
    direct: stream.PathStats
    platform: stream.PathStats
    ttft_added_ms: Difference
    tokens_per_s_ratio: float
    worker_cpu_s: float  # the worker's processes, over the platform's loop
    worker_cores: float  # worker_cpu_s over the loop's wall time
    worker_cpu_us_per_token: float
    tokens_per_worker_core_s: float  # tokens relayed per second of worker CPU
    bare: BareReader
    worker_over_bare: float  # the worker's CPU per token over the bare reader's
    api_cpu_us_per_token: float  # the API process's CPU over the platform's loop, a token


@dataclass(frozen=True)
class Burst:
    """`streams` jobs submitted at once; their times to first token (ms)."""

    streams: int
    errors: int
    ttft_ms: Percentiles
    submit_ms: Percentiles  # the POST /v1/jobs part of the TTFT: the API's, not the worker's


@dataclass(frozen=True)
class RelayResult:
    note: str
    worker_processes: int
    worker_concurrency: int
    output_tokens: int  # of every reply
    levels: list[RelayLevel]
    first_burst: Burst  # a fresh worker's first streams
    warm_burst: Burst  # the same burst at the end, the worker warm
    first_over_warm_p50: float
    first_over_warm_p99: float
    # Over every level: tokens relayed per second of worker CPU (the headline figure), and
    # the bare reader's tokens per second of its CPU beside it.
    tokens_per_worker_core_s: float
    bare_tokens_per_core_s: float


NOTE = (
    "Own simulators (one per inter-token latency), API and worker. Levels: closed loops direct,"
    " then through the platform (as the stream phase), then bench/bare_reader.py on the same"
    " streams in its own process. Worker CPU: user + system of the worker's processes over the"
    " platform's loop (the API's beside it). The platform's clients use a key made through the"
    " admin API. Bursts: `burst` jobs submitted at once to a fresh worker (after the API"
    " was warmed on a model no worker serves), then again at the end."
)


@dataclass
class RelayPlatform:
    api_url: str
    api_key: str  # a user's, made through the admin API: the path every client takes
    api: Child
    worker: Child
    sims: dict[float, Sim]
    processes: int


def start(cluster: Cluster, config: RelayConfig) -> tuple[RelayPlatform, list[Child]]:
    itls = sorted({itl for _, itl in config.levels})
    sims = {
        itl: cluster.start_sim(f"sim-relay-{itl:g}ms", config.stream(1, itl).sim) for itl in itls
    }
    tokens = max(config.output_tokens, 16)
    entries = [
        ModelEntry(model_of(itl), sim.url, cluster.queue(model_of(itl)), tokens)
        for itl, sim in sims.items()
    ]
    entries.append(ModelEntry(VOID, sims[itls[0]].url, cluster.queue(VOID), tokens))
    models = cluster.models_file("relay", entries)
    api_url, api = cluster.start_api(models, role="api-relay")
    processes = config.processes or nodes.default_processes(config.concurrency)
    node = "relay"
    worker = cluster.start_worker(
        node, [model_of(itl) for itl in itls], config.concurrency, models, processes, config.streams
    )
    for sim in sims.values():
        wait_http(f"{sim.url}/health", sim.child)
    wait_http(f"{api_url}/readyz", api)
    names = nodes.node_names(cluster.node_name(node), processes)
    cluster.wait_nodes(names, [worker])
    children = [api, worker, *(sim.child for sim in sims.values())]
    (key,) = uvloop.run(create_keys(api_url, cluster.api_key, 1, "relay"))
    return RelayPlatform(api_url, key, api, worker, sims, processes), children


def _targets(platform: RelayPlatform, model: str, itl: float) -> stream.StreamTargets:
    return stream.StreamTargets(platform.api_url, platform.api_key, model, platform.sims[itl].url)


async def _burst(targets: stream.StreamTargets, count: int, output_tokens: int, tag: str) -> Burst:
    requests = [
        Request(f"relay burst {tag} {i}", output_tokens, seed=50_000 + i) for i in range(count)
    ]
    with targets.connections(count) as connections:
        send = targets.platform_send(connections)
        timings: list[Timing] = await asyncio.gather(
            *(send(i, request) for i, request in enumerate(requests))
        )
    ok = [t for t in timings if t.ok]
    submits = [t.submit_ms for t in ok if t.submit_ms is not None]
    return Burst(
        count, count - len(ok), Percentiles.of([t.ttft_ms for t in ok]), Percentiles.of(submits)
    )


def _bare_reader(url: str, clients: int, rounds: int, tokens: int) -> BareReader:
    command = [sys.executable, "-m", "bench.bare_reader", url]
    command += ["--clients", str(clients), "--rounds", str(rounds), "--tokens", str(tokens)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=BARE_READER_TIMEOUT_S, check=True
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    read, cpu = int(figures["tokens"]), float(figures["cpu_s"])
    return BareReader(read, round(cpu, 3), int(figures["errors"]), ratio(cpu * 1e6, read))


def run_level(
    cluster: Cluster,
    platform: RelayPlatform,
    config: RelayConfig,
    clients: int,
    itl: float,
    tick: Tick,
) -> RelayLevel:
    level_config = config.stream(clients, itl)
    targets = _targets(platform, model_of(itl), itl)
    direct_run = uvloop.run(stream.closed_loop(targets.direct_send(), level_config, clients, tick))
    with targets.connections(clients) as connections:
        cpu = cpu_seconds(platform.worker.pid) or 0.0
        api_cpu = cpu_seconds(platform.api.pid) or 0.0
        platform_run = uvloop.run(
            stream.closed_loop(targets.platform_send(connections), level_config, clients, tick)
        )
        worker_cpu = (cpu_seconds(platform.worker.pid) or 0.0) - cpu
        api_cpu = (cpu_seconds(platform.api.pid) or 0.0) - api_cpu
    direct, through = stream.PathStats.of(direct_run), stream.PathStats.of(platform_run)
    rounds = level_config.requests_per_client(clients)
    bare = _bare_reader(targets.sim_url, clients, rounds, config.output_tokens)
    worker_us = ratio(worker_cpu * 1e6, through.output_tokens)
    return RelayLevel(
        clients=clients,
        itl_ms=itl,
        requests_per_client=rounds,
        direct=direct,
        platform=through,
        ttft_added_ms=through.ttft_ms.minus(direct.ttft_ms),
        tokens_per_s_ratio=ratio(through.tokens_per_s, direct.tokens_per_s),
        worker_cpu_s=round(worker_cpu, 3),
        worker_cores=ratio(worker_cpu, platform_run.wall_s),
        worker_cpu_us_per_token=worker_us,
        tokens_per_worker_core_s=ratio(through.output_tokens, worker_cpu),
        bare=bare,
        worker_over_bare=ratio(worker_us, bare.cpu_us_per_token),
        api_cpu_us_per_token=ratio(api_cpu * 1e6, through.output_tokens),
    )


def _warm_api(targets: stream.StreamTargets, count: int) -> None:
    """Submits on a model no worker serves: the API's first requests, without the worker."""
    void = stream.StreamTargets(targets.api_url, targets.api_key, VOID, targets.sim_url)

    async def submit_all() -> None:
        with void.connections(count) as connections:
            body = json.dumps(Request("warm the api", 4, seed=0).job(VOID)).encode()
            await asyncio.gather(*(c.post_json("/v1/jobs", body) for c in connections))

    uvloop.run(submit_all())


def total_requests(config: RelayConfig) -> int:
    """Requests of the levels, both paths (for the progress bar)."""
    return sum(
        2 * clients * config.stream(clients, itl).requests_per_client(clients)
        for clients, itl in config.levels
    )


def run(
    cluster: Cluster, config: RelayConfig, tick: Tick, progress: Callable[[str], None]
) -> RelayResult:
    platform, children = start(cluster, config)
    try:
        first_itl = config.levels[0][1]
        burst_targets = _targets(platform, model_of(first_itl), first_itl)
        _warm_api(burst_targets, min(config.burst, 8))
        progress("relay: a fresh worker's first burst")
        first = uvloop.run(_burst(burst_targets, config.burst, config.output_tokens, "first"))
        levels = []
        for clients, itl in config.levels:
            progress(f"relay C={clients}, {itl:g} ms")
            levels.append(run_level(cluster, platform, config, clients, itl, tick))
        progress("relay: the warm burst")
        warm = uvloop.run(_burst(burst_targets, config.burst, config.output_tokens, "warm"))
    finally:
        cluster.stop(children)
    tokens = sum(level.platform.output_tokens for level in levels)
    cpu = sum(level.worker_cpu_s for level in levels)
    bare_tokens = sum(level.bare.tokens for level in levels)
    bare_cpu = sum(level.bare.cpu_s for level in levels)
    return RelayResult(
        note=NOTE,
        worker_processes=platform.processes,
        worker_concurrency=config.concurrency,
        output_tokens=config.output_tokens,
        levels=levels,
        first_burst=first,
        warm_burst=warm,
        first_over_warm_p50=ratio(first.ttft_ms.p50, warm.ttft_ms.p50),
        first_over_warm_p99=ratio(first.ttft_ms.p99, warm.ttft_ms.p99),
        tokens_per_worker_core_s=ratio(tokens, cpu),
        bare_tokens_per_core_s=ratio(bare_tokens, bare_cpu),
    )
