"""The SSE clients of the fan-out phase, run in several processes so the client keeps up."""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter
from dataclasses import dataclass, field

import uvloop

from bench.wire import Frame, event_stream


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
    jobs = assignment.job_ids
    await asyncio.gather(
        *(
            _Client(assignment, headers, jobs[index % len(jobs)], index, report, errors).hold()
            for index in assignment.clients
        )
    )
    report.errors = dict(errors)
    return report


class _Client:
    """One SSE client: connects on schedule, counts and times live tokens until the end."""

    def __init__(
        self,
        assignment: Assignment,
        headers: dict[str, str],
        job_id: str,
        index: int,
        report: ClientReport,
        errors: Counter[str],
    ) -> None:
        self.assignment, self.headers, self.job_id, self.index = assignment, headers, job_id, index
        self.schedule = assignment.schedule
        self.report, self.errors = report, errors
        self.connected_ms = 0.0
        self.seen = False
        self.job_ended = False

    async def hold(self) -> None:
        schedule = self.schedule
        await asyncio.sleep(max(0.0, schedule.connect_at(self.index) - time.time()))
        self.connected_ms = time.time() * 1000
        # Resume from now, as a client that was already watching would: no replay of history.
        url = f"{self.assignment.api_url}/v1/jobs/{self.job_id}/events"
        url += f"?after={int(self.connected_ms)}-0"
        opened = False
        try:
            async with asyncio.timeout(max(0.0, schedule.hold_end - time.time())):
                async with event_stream(url, self.headers, self.on_frame) as stream:
                    if stream.status != 200:
                        self.errors[f"HTTP {stream.status}"] += 1
                        return
                    opened = True
                    await stream.finished
                    if not self.job_ended:
                        self.errors["stream ended early"] += 1
        except TimeoutError:
            if self.seen:
                self.report.held += 1
            else:
                self.errors["no event" if opened else "no response"] += 1
        except OSError as exc:
            self.errors[type(exc).__name__] += 1

    def on_frame(self, frame: Frame) -> None:
        report = self.report
        if not self.seen and frame.received <= self.schedule.hold_start:
            report.held_at_hold_start += 1
        self.seen = True
        report.events += 1
        _record_lag(frame.event, frame.id, frame.received, self.connected_ms, self.schedule, report)
        if frame.event in ("done", "error"):
            self.job_ended = True
            self.errors[f"job ended ({frame.event})"] += 1


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
