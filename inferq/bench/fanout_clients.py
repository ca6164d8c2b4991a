"""The SSE clients of the fan-out phase, run in several processes so the client keeps up."""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import uvloop
from httpx_sse import aconnect_sse

from inferq.bench.clients import ClientShards


@dataclass(frozen=True)
class Schedule:
    """Wall-clock plan shared by every client process (time.time() seconds)."""

    ramp_start: float
    ramp_s: float
    hold_s: float
    total_clients: int

    @property
    def hold_start(self) -> float:
        return self.ramp_start + self.ramp_s

    @property
    def hold_end(self) -> float:
        return self.hold_start + self.hold_s

    def connect_at(self, client: int) -> float:
        return self.ramp_start + self.ramp_s * client / self.total_clients


@dataclass(frozen=True)
class Assignment:
    """What one client process does: its clients (global indexes) and their jobs."""

    api_url: str
    api_key: str
    job_ids: list[str]
    clients: list[int]
    schedule: Schedule


@dataclass
class ClientReport:
    """What one client process saw."""

    clients: int = 0
    held: int = 0  # received at least one event and stayed open until the end
    held_at_hold_start: int = 0
    events: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lags_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0


def run_clients(assignment: Assignment) -> ClientReport:
    """Process entry point: hold every assigned client open through the schedule."""
    started = time.monotonic()
    report = uvloop.run(_hold_all(assignment))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report.cpu_s = usage.ru_utime + usage.ru_stime
    report.wall_s = time.monotonic() - started
    return report


async def _hold_all(assignment: Assignment) -> ClientReport:
    report = ClientReport(clients=len(assignment.clients))
    errors: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {assignment.api_key}"}
    users = len(assignment.clients)
    async with ClientShards(users, base_url=assignment.api_url, headers=headers) as shards:
        jobs = assignment.job_ids
        await asyncio.gather(
            *(
                _hold(
                    shards[n], jobs[index % len(jobs)], index, assignment.schedule, report, errors
                )
                for n, index in enumerate(assignment.clients)
            )
        )
    report.errors = dict(errors)
    return report


async def _hold(
    http: httpx.AsyncClient,
    job_id: str,
    index: int,
    schedule: Schedule,
    report: ClientReport,
    errors: Counter[str],
) -> None:
    await asyncio.sleep(max(0.0, schedule.connect_at(index) - time.time()))
    connected_ms = time.time() * 1000
    # Resume from now, as a client that was already watching would: no replay of history.
    url = f"/v1/jobs/{job_id}/events?after={int(connected_ms)}-0"
    seen = opened = False
    try:
        async with asyncio.timeout(max(0.0, schedule.hold_end - time.time())):
            async with aconnect_sse(http, "GET", url) as source:
                if source.response.status_code != 200:
                    errors[f"HTTP {source.response.status_code}"] += 1
                    return
                opened = True
                async for event in source.aiter_sse():
                    now = time.time()
                    if not seen and now <= schedule.hold_start:
                        report.held_at_hold_start += 1
                    seen = True
                    report.events += 1
                    _record_lag(event.event, event.id, now, connected_ms, schedule, report)
                    if event.event in ("done", "error"):
                        errors[f"job ended ({event.event})"] += 1
                        return
    except TimeoutError:
        if seen:
            report.held += 1
        else:
            errors["no event" if opened else "no response"] += 1
    except httpx.HTTPError as exc:
        errors[type(exc).__name__] += 1


def _record_lag(
    kind: str,
    event_id: str | None,
    now: float,
    connected_ms: float,
    schedule: Schedule,
    report: ClientReport,
) -> None:
    """Flush-to-receive lag of a live token received during the hold window."""
    if kind != "token" or not event_id or not schedule.hold_start <= now <= schedule.hold_end:
        return
    flushed_ms = int(event_id.partition("-")[0])
    if flushed_ms >= connected_ms:  # replayed history is not delivery lag
        report.lags_ms.append(now * 1000 - flushed_ms)
