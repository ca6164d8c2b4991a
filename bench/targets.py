"""The benchmark's targets, checked against a run's figures."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.runner import BenchResult

STREAM_C = 64
MIB_LIMIT = 512


@dataclass(frozen=True)
class Check:
    target: str
    measured: str
    met: bool | None  # None: the run has no figure for it


def _check(target: str, value: float | None, ok: bool, fmt: str = "{:.1f}") -> Check:
    if value is None or math.isnan(value):
        return Check(target, "n/a", None)
    return Check(target, fmt.format(value), ok)


def _stream(result: BenchResult) -> list[Check]:
    levels = result.stream.levels if result.stream else []
    level = next((lv for lv in levels if lv.concurrency == STREAM_C), None)
    if level is None:
        return [Check(f"stream C={STREAM_C}", "n/a", None)]
    o = level.overhead
    return [
        _check(
            f"stream C={STREAM_C}: TTFT over direct p50 <= 10 ms",
            o.ttft_ms.p50,
            o.ttft_ms.p50 <= 10,
        ),
        _check(
            f"stream C={STREAM_C}: TTFT over direct p99 <= 50 ms",
            o.ttft_ms.p99,
            o.ttft_ms.p99 <= 50,
        ),
        _check(
            f"stream C={STREAM_C}: tokens/s >= 0.95 x direct",
            o.tokens_per_s_ratio,
            o.tokens_per_s_ratio >= 0.95,
            "{:.3f}",
        ),
    ]


def _submit(result: BenchResult) -> list[Check]:
    if result.submit is None:
        return []
    within = [lv.jobs_per_s for lv in result.submit.levels if lv.latency_ms.p99 <= 50]
    best = max(within, default=math.nan)
    return [_check("submit: >= 1000 jobs/s with p99 <= 50 ms", best, best >= 1000, "{:.0f} jobs/s")]


def _fanout(result: BenchResult) -> list[Check]:
    f = result.fanout
    if f is None:
        return []
    lag = f.delivery_lag_ms.p99
    return [
        _check(
            "fan-out: >= 5000 clients held",
            f.connections_held,
            f.connections_held >= 5000,
            "{:.0f}",
        ),
        _check(
            f"fan-out: API resident < {MIB_LIMIT} MiB",
            f.api_rss_peak_mib,
            f.api_rss_peak_mib < MIB_LIMIT,
        ),
        _check("fan-out: delivery lag p99 <= 250 ms", lag, lag <= 250),
    ]


def _scale(result: BenchResult) -> list[Check]:
    if result.scale is None:
        return []
    three = next((lv for lv in result.scale.levels if lv.workers == 3), None)
    value = three.efficiency if three else None
    return [
        _check(
            "scale: efficiency >= 0.9 at 3 workers", value, bool(value and value >= 0.9), "{:.3f}"
        )
    ]


def check(result: BenchResult) -> list[Check]:
    return [*_stream(result), *_submit(result), *_fanout(result), *_scale(result)]
