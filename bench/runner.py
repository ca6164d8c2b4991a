"""One benchmark run: servers, the platform's processes, the phases, the report."""

from __future__ import annotations

import datetime as dt
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from bench import fairness, fanout, relay, report, scale, stream, submit, targets
from bench.cluster import Cluster, ModelEntry, Sim
from bench.config import BenchConfig, Phase
from bench.environment import Environment
from bench.monitor import CpuMeter, CpuUsage
from bench.probe import speed_probe_ms
from bench.servers import data_servers
from inferq.processes import Child, wait_http

# Every model the API knows; the main worker serves `stream` and `fanout`, none serves `void`,
# and `scale` and `fairness` are served by their phases' own workers.
MODELS = ("stream", "fanout", "void", "scale", "fairness")


@dataclass
class BenchResult:
    started_at: str
    config: BenchConfig
    environment: Environment
    duration_s: float = 0.0
    stream: stream.StreamResult | None = None
    submit: submit.SubmitResult | None = None
    fanout: fanout.FanoutResult | None = None
    scale: scale.ScaleResult | None = None
    fairness: fairness.FairnessResult | None = None
    relay: relay.RelayResult | None = None
    cpu: dict[str, CpuUsage] = field(default_factory=dict)
    # The machine's speed probe (ms, lower is faster) before each phase, and at the end.
    speed_probe_ms: dict[str, float] = field(default_factory=dict)
    targets: list[targets.Check] = field(default_factory=list)


@dataclass(frozen=True)
class Platform:
    """The long-lived processes: one API, one worker, the stream and fan-out simulators."""

    api_url: str
    api: Child
    workers: list[Child]
    stream_sim: Sim
    fanout_sim: Sim
    models_file: Path


def raise_nofile_limit() -> None:
    """Up to the hard limit, before children are spawned so that they inherit it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_platform(cluster: Cluster, config: BenchConfig) -> Platform:
    stream_sim = cluster.start_sim("sim-stream", config.stream.sim)
    fanout_sim = cluster.start_sim("sim-fanout", config.fanout.sim)
    urls = {"fanout": fanout_sim.url}
    entries = [
        ModelEntry(name, urls.get(name, stream_sim.url), cluster.queue(name), 4096)
        for name in MODELS
    ]
    models = cluster.models_file("platform", entries)
    api_url, api = cluster.start_api(models)
    names = [f"main-{i}" for i in range(config.worker_processes)]
    # One process each, as the stream phase's figures have always been taken.
    workers = [
        cluster.start_worker(name, ["stream", "fanout"], config.worker_concurrency, models, 1)
        for name in names
    ]
    for sim in (stream_sim, fanout_sim):
        wait_http(f"{sim.url}/health", sim.child)
    wait_http(f"{api_url}/readyz", api)
    cluster.wait_workers(names, workers)
    return Platform(api_url, api, workers, stream_sim, fanout_sim, models)


class Bench:
    """Runs the selected phases against one platform, with a progress display."""

    def __init__(
        self, config: BenchConfig, cluster: Cluster, platform: Platform, progress: Progress
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.platform = platform
        self.progress = progress
        self.extra_cpu: dict[str, float] = {}  # CPU the meter cannot see, by role

    def run(self, result: BenchResult) -> None:
        """Each selected phase in order; its figures and its CPU by process go in `result`."""
        runs: dict[Phase, Callable[[], object]] = {
            Phase.stream: self.run_stream,
            Phase.submit: self.run_submit,
            Phase.fanout: self.run_fanout,
            Phase.scale: self.run_scale,
            Phase.fairness: self.run_fairness,
            Phase.relay: self.run_relay,
        }
        for phase in self.config.phases:
            result.speed_probe_ms[phase.value] = speed_probe_ms()
            meter = CpuMeter(self.cluster.cpu)
            meter.start()
            self.extra_cpu = {}
            setattr(result, phase.value, runs[phase]())
            result.cpu[phase.value] = meter.stop(self.extra_cpu)
        result.speed_probe_ms["end"] = speed_probe_ms()

    def _ticker(self, description: str, total: float) -> tuple[TaskID, Callable[[], None]]:
        task = self.progress.add_task(description, total=total)
        return task, lambda: self.progress.advance(task)

    def run_stream(self) -> stream.StreamResult:
        config = self.config.stream
        targets = stream.StreamTargets(
            self.platform.api_url, self.cluster.api_key, "stream", self.platform.stream_sim.url
        )
        task, tick = self._ticker("stream warm-up", stream.total_requests(config))
        uvloop.run(stream.warm_up(config, targets))
        levels = []
        for clients in config.concurrency:
            self.progress.update(task, description=f"stream C={clients}")
            levels.append(uvloop.run(stream.run_level(config, targets, clients, tick)))
        return stream.StreamResult("stream", stream.NOTE, levels)

    def run_submit(self) -> submit.SubmitResult:
        config = self.config.submit
        total = len(config.api_processes) * len(config.concurrency) * config.jobs_per_level
        _, tick = self._ticker("submit", total)
        levels: list[submit.SubmitLevel] = []
        for processes in config.api_processes:
            if processes == 1:
                url = self.platform.api_url
                levels += uvloop.run(submit.run(url, self.cluster.api_key, config, 1, tick))
                continue
            role = f"api-{processes}-processes"
            url, api = self.cluster.start_api(self.platform.models_file, processes, role)
            try:
                wait_http(f"{url}/readyz", api)
                levels += uvloop.run(submit.run(url, self.cluster.api_key, config, processes, tick))
            finally:
                api.stop()
        queue = self.cluster.queue(submit.MODEL)
        self.cluster.clear_queue(queue)
        note = (
            f"model '{submit.MODEL}' on queue {queue}, which no worker consumes: the front door"
            " alone; the platform's API process, then `inferq api --workers N`"
        )
        return submit.SubmitResult(submit.MODEL, queue, note, levels)

    def run_fanout(self) -> fanout.FanoutResult:
        config = self.config.fanout
        total = fanout.SPAWN_MARGIN_S + config.ramp_s + config.hold_s
        task, _ = self._ticker(f"fan-out {config.clients} clients (s)", total)
        target = fanout.FanoutTarget(
            self.platform.api_url, self.cluster.api_key, "fanout", self.platform.api.pid
        )
        result = fanout.run(
            config, target, lambda elapsed: self.progress.update(task, completed=elapsed)
        )
        self.extra_cpu["fan-out client processes"] = result.client_cpu_s
        return result

    def run_scale(self) -> scale.ScaleResult:
        config = self.config.scale
        target = scale.ScaleTarget(self.cluster, self.platform.api_url, "scale")
        task, tick = self._ticker("scale", 2 * config.jobs_per_worker * sum(config.workers))
        levels = []
        for count in config.workers:
            self.progress.update(task, description=f"scale {count} worker(s)")
            levels.append(scale.run_level(target, config, count, tick))
        queue = self.cluster.queue("scale")
        return scale.ScaleResult("scale", queue, scale.NOTE, scale.with_efficiency(levels))

    def run_relay(self) -> relay.RelayResult:
        config = self.config.relay
        task, tick = self._ticker("relay", relay.total_requests(config))

        def describe(text: str) -> None:
            self.progress.update(task, description=text)

        return relay.run(self.cluster, config, tick, describe)

    def run_fairness(self) -> fairness.FairnessResult:
        config = self.config.fairness
        task = self.progress.add_task(f"fairness: {config.flood_jobs} jobs, then 1", total=None)
        target = fairness.FairnessTarget(self.cluster, self.platform.api_url, "fairness")
        result = fairness.run(target, config)
        self.progress.remove_task(task)
        return result


def run_bench(
    config: BenchConfig,
    out_dir: Path,
    database_url: str | None,
    redis_url: str | None,
    console: Console,
) -> BenchResult:
    """Run every selected phase on fresh processes, write bench.json and the chart, print."""
    raise_nofile_limit()
    logs = out_dir / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    started = time.monotonic()
    with data_servers(database_url, redis_url) as servers:
        console.print(f"[dim]database {servers.database_url.rsplit('/', 1)[-1]}, logs in {logs}")
        result = BenchResult(
            started_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            config=config,
            environment=Environment.capture(servers),
        )
        cluster = Cluster(servers, logs)
        try:
            with _progress(console) as progress:
                task = progress.add_task("starting the platform", total=None)
                platform = start_platform(cluster, config)
                progress.remove_task(task)
                Bench(config, cluster, platform, progress).run(result)
        finally:
            cluster.close()
    result.duration_s = round(time.monotonic() - started, 1)
    result.targets = targets.check(result)
    report.write(result, out_dir)
    report.print_tables(result, console)
    return result


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
