"""Phase 3: many SSE clients on one API process while a few long jobs stream tokens."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from bench.config import FanoutConfig
from bench.fanout_clients import Assignment, ClientReport, Schedule, run_clients
from bench.monitor import PeakRss
from bench.stats import Percentiles

Progress = Callable[[float], None]
MIB = 1024 * 1024
# Client processes need a moment to start (spawn imports the bench afresh).
SPAWN_MARGIN_S = 3.0
# A client process using more CPU than this share of its wall time is the bottleneck.
CLIENT_BOUND = 0.9


@dataclass(frozen=True)
class FanoutTarget:
    api_url: str
    api_key: str
    model: str
    api_pid: int


@dataclass(frozen=True)
class FanoutResult:
    target_clients: int
    jobs: int
    client_processes: int
    connections_held: int
    held_at_hold_start: int
    events_received: int
    errors: dict[str, int]
    api_rss_before_mib: float
    api_rss_peak_mib: float
    delivery_lag_ms: Percentiles
    client_cpu_share: list[float]  # CPU seconds / wall seconds of each client process
    client_cpu_s: float
    client_bound: bool
    note: str


def _submit_jobs(http: httpx.Client, model: str, config: FanoutConfig) -> list[str]:
    ids = []
    for index in range(config.jobs):
        body = {
            "model": model,
            "prompt": f"fan-out job {index}",
            "max_tokens": config.sim.output_tokens,
            "seed": index,
            "cache": False,
        }
        response = http.post("/v1/jobs", json=body)
        response.raise_for_status()
        ids.append(response.json()["id"])
    return ids


def _wait_running(http: httpx.Client, job_ids: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for job_id in job_ids:
        while http.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
            if time.monotonic() > deadline:
                raise RuntimeError(f"fan-out job {job_id} did not start within {timeout}s")
            time.sleep(0.1)


def _assignments(
    config: FanoutConfig, target: FanoutTarget, job_ids: list[str]
) -> list[Assignment]:
    """Clients dealt round-robin to the processes, on one shared wall-clock schedule."""
    schedule = Schedule(time.time() + SPAWN_MARGIN_S, config.ramp_s, config.hold_s, config.clients)
    processes = config.client_processes
    return [
        Assignment(
            target.api_url,
            target.api_key,
            job_ids,
            list(range(p, config.clients, processes)),
            schedule,
        )
        for p in range(processes)
    ]


def _run_processes(
    assignments: list[Assignment], timeout: float, progress: Progress
) -> list[ClientReport]:
    """Run the client processes; report the seconds elapsed while waiting for them."""
    context = multiprocessing.get_context("spawn")
    started = time.monotonic()
    with context.Pool(len(assignments)) as pool:
        pending = pool.map_async(run_clients, assignments)
        while not pending.ready():
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"fan-out clients still running after {timeout}s")
            progress(time.monotonic() - started)
            pending.wait(0.5)
        return pending.get()


def run(config: FanoutConfig, target: FanoutTarget, progress: Progress) -> FanoutResult:
    """Start the long jobs, hold the clients open on them, then cancel the jobs."""
    headers = {"Authorization": f"Bearer {target.api_key}"}
    with httpx.Client(base_url=target.api_url, headers=headers, timeout=30) as http:
        job_ids = _submit_jobs(http, target.model, config)
        try:
            _wait_running(http, job_ids)
            assignments = _assignments(config, target, job_ids)
            timeout = SPAWN_MARGIN_S + config.ramp_s + config.hold_s + 120
            with PeakRss(target.api_pid) as rss:
                reports = _run_processes(assignments, timeout, progress)
        finally:
            for job_id in job_ids:
                # The API may still be working through the clients' hang-ups: be patient.
                http.post(f"/v1/jobs/{job_id}/cancel", timeout=120)
    return _result(config, reports, rss)


def _result(config: FanoutConfig, reports: list[ClientReport], rss: PeakRss) -> FanoutResult:
    errors: Counter[str] = Counter()
    for report in reports:
        errors.update(report.errors)
    shares = [round(r.cpu_s / r.wall_s, 2) if r.wall_s else 0.0 for r in reports]
    bound = any(share > CLIENT_BOUND for share in shares)
    note = (
        f"{config.clients} clients over {config.client_processes} client processes; "
        f"each connects with ?after=<its connect time> (live tokens only, no replay of the jobs'"
        f" history); connect ramp {config.ramp_s}s, then lag measured over {config.hold_s}s:"
        " client receive time minus the Redis stream id's ms (the worker's flush)."
    )
    if bound:
        note += " A client process was CPU-bound: lag includes client-side queueing."
    return FanoutResult(
        target_clients=config.clients,
        jobs=config.jobs,
        client_processes=config.client_processes,
        connections_held=sum(r.held for r in reports),
        held_at_hold_start=sum(r.held_at_hold_start for r in reports),
        events_received=sum(r.events for r in reports),
        errors=dict(errors),
        api_rss_before_mib=round(rss.first / MIB, 1),
        api_rss_peak_mib=round(rss.peak / MIB, 1),
        delivery_lag_ms=Percentiles.of([lag for r in reports for lag in r.lags_ms]),
        client_cpu_share=shares,
        client_cpu_s=round(sum(r.cpu_s for r in reports), 2),
        client_bound=bound,
        note=note,
    )
