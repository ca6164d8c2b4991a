"""Fault injection: per-request headers, a runtime schedule, and a random error rate."""

from __future__ import annotations

import random
from dataclasses import dataclass

from sim.errors import BodyRejection
from sim.schemas import DEFAULT_FAULT_STALL_MS, FaultMode, FaultRequest

FAULT_HEADER = "x-sim-error"
STALL_HEADER = "x-sim-stall-ms"


@dataclass(frozen=True, slots=True)
class Fault:
    """The fault one request receives."""

    mode: FaultMode
    stall_ms: float = 0.0


class Faults:
    """Decides which fault, if any, each request gets."""

    def __init__(self, error_rate: float, seed: int) -> None:
        self._error_rate = error_rate
        self._rng = random.Random(seed)
        self._scheduled: Fault | None = None
        self._remaining: int | None = None

    def schedule(self, request: FaultRequest) -> None:
        """Give the next `count` requests (all, if null) the fault `mode`; null mode clears."""
        if request.mode is None:
            self.clear()
            return
        self._scheduled = Fault(request.mode, request.stall_ms)
        self._remaining = request.count

    def clear(self) -> None:
        """Remove the scheduled fault."""
        self._scheduled = None
        self._remaining = None

    def state(self) -> dict[str, object]:
        """The scheduled fault, as JSON."""
        mode = self._scheduled.mode.value if self._scheduled else None
        return {"mode": mode, "remaining": self._remaining}

    def take(self, header: str | None, stall_header: str | None = None) -> Fault | None:
        """The fault for one request: header first, then the schedule, then the error rate."""
        if header:
            return _from_header(header, stall_header)
        scheduled = self._scheduled
        if scheduled is not None:
            self._count_down()
            return scheduled
        if self._error_rate and self._rng.random() < self._error_rate:
            return Fault(FaultMode.GENERATION)
        return None

    def _count_down(self) -> None:
        if self._remaining is None:
            return
        self._remaining -= 1
        if self._remaining <= 0:
            self.clear()


def _from_header(value: str, stall_header: str | None) -> Fault:
    try:
        mode = FaultMode(value.strip().lower())
    except ValueError:
        choices = ", ".join(m.value for m in FaultMode)
        raise BodyRejection(400, f"X-Sim-Error must be one of: {choices}") from None
    try:
        stall_ms = float(stall_header) if stall_header else DEFAULT_FAULT_STALL_MS
    except ValueError:
        raise BodyRejection(400, "X-Sim-Stall-Ms must be a number") from None
    return Fault(mode, stall_ms)
