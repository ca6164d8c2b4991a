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


# The relay phase's bars: (clients, inter-token ms) -> least tokens/s ratio to direct.
RELAY_RATIO = {(64, 10.0): 0.95, (256, 20.0): 0.90}
RELAY_TTFT_LEVEL, RELAY_TTFT_P50_MS, RELAY_TTFT_P99_MS = (64, 10.0), 25.0, 100.0
RELAY_TOKENS_PER_CORE_S = 15_000
RELAY_FIRST_BURST = 2.0  # a fresh worker's first TTFTs, at most this times the warm ones


def _relay(result: BenchResult) -> list[Check]:
    relay = result.relay
    if relay is None:
        return []
    checks = []
    for level in relay.levels:
        key = (level.clients, level.itl_ms)
        name = f"relay C={level.clients} at {level.itl_ms:g} ms"
        if key in RELAY_RATIO:
            bound, value = RELAY_RATIO[key], level.tokens_per_s_ratio
            checks.append(
                _check(f"{name}: tokens/s >= {bound} x direct", value, value >= bound, "{:.3f}")
            )
        if key == RELAY_TTFT_LEVEL:
            added = level.ttft_added_ms
            for label, value, bound in (
                ("p50", added.p50, RELAY_TTFT_P50_MS),
                ("p99", added.p99, RELAY_TTFT_P99_MS),
            ):
                checks.append(
                    _check(f"{name}: TTFT added {label} <= {bound:g} ms", value, value <= bound)
                )
    value = relay.tokens_per_worker_core_s
    checks.append(
        _check(
            f"relay: >= {RELAY_TOKENS_PER_CORE_S:,} tokens per second of worker CPU",
            value,
            value >= RELAY_TOKENS_PER_CORE_S,
            "{:,.0f}",
        )
    )
    worst = max(relay.first_over_warm_p50, relay.first_over_warm_p99)
    checks.append(
        _check(
            f"relay: a fresh worker's first TTFTs <= {RELAY_FIRST_BURST:g} x warm (p50, p99)",
            worst,
            worst <= RELAY_FIRST_BURST,
            "x{:.2f}",
        )
    )
    return checks


def check(result: BenchResult) -> list[Check]:
    return [*_stream(result), *_submit(result), *_fanout(result), *_scale(result), *_relay(result)]
