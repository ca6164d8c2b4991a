"""Where the CPU goes: CPU seconds per process role over a phase, and a peak-RSS sampler."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

# Shared servers are not ours, but their CPU is part of the cost: counted by process name
# (every such process on the machine, so approximate when others use them too).
SERVER_NAMES = {"postgres": "postgres (all)", "redis-server": "redis (all)"}


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds by role over `wall_s`; `cores_busy` is machine-wide (2.0 = both cores).

    `cores_stolen` is the time the hypervisor ran something else while this machine wanted
    its cores (Linux's steal time), in cores: a sign that the host, not the run, was busy.
    """

    wall_s: float
    cores_busy: float
    seconds: dict[str, float]
    cores_stolen: float = 0.0

    def top(self, count: int = 5) -> list[tuple[str, float]]:
        """The busiest roles as (role, cores used on average)."""
        if not self.wall_s:
            return []
        ranked = sorted(self.seconds.items(), key=lambda item: -item[1])
        return [(role, round(sec / self.wall_s, 2)) for role, sec in ranked[:count]]


def _servers() -> dict[str, float]:
    seconds: dict[str, float] = {}
    for process in psutil.process_iter(["name", "cpu_times"]):
        role = SERVER_NAMES.get(process.info["name"] or "")
        times = process.info["cpu_times"]
        if role and times is not None:
            seconds[role] = seconds.get(role, 0.0) + times.user + times.system
    return seconds


def _own() -> float:
    """The bench process itself, without the children it has reaped."""
    times = os.times()
    return times.user + times.system


def _machine_seconds() -> tuple[float, float]:
    """Machine-wide (busy, stolen) CPU seconds since boot, from one reading."""
    times = psutil.cpu_times()
    busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
    return float(busy), float(getattr(times, "steal", 0.0))


@dataclass
class CpuMeter:
    """Measures one phase: `start()`, run the phase, `stop()`; `children` gives CPU by role."""

    children: Callable[[], dict[str, float]]
    _start: dict[str, float] = field(default_factory=dict)
    _busy: float = 0.0
    _stolen: float = 0.0
    _t0: float = 0.0

    def _snapshot(self) -> dict[str, float]:
        return {"bench": _own(), **self.children(), **_servers()}

    def start(self) -> None:
        self._start = self._snapshot()
        self._busy, self._stolen = _machine_seconds()
        self._t0 = time.monotonic()

    def stop(self, extra: dict[str, float] | None = None) -> CpuUsage:
        """The phase's usage; `extra` adds CPU measured elsewhere (e.g. client processes)."""
        wall = time.monotonic() - self._t0
        end = self._snapshot()
        seconds = {role: round(end[role] - self._start.get(role, 0.0), 2) for role in end}
        seconds.update(extra or {})
        busy_s, stolen_s = _machine_seconds()
        busy = (busy_s - self._busy) / wall if wall else 0.0
        stolen = (stolen_s - self._stolen) / wall if wall else 0.0
        return CpuUsage(round(wall, 2), round(busy, 2), seconds, round(stolen, 3))


class PeakRss:
    """Samples a process's resident memory in a thread; `peak` is the highest seen (bytes)."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self.first = self._rss()
        self.peak = self.first

    def _rss(self) -> int:
        try:
            return int(self._process.memory_info().rss)
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
