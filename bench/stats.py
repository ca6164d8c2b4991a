"""Percentiles and differences, the only arithmetic the report needs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Percentiles:
    """A latency distribution in milliseconds."""

    n: int
    p50: float
    p95: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            n=len(values),
            p50=percentile(values, 50),
            p95=percentile(values, 95),
            p99=percentile(values, 99),
            mean=sum(values) / len(values),
            max=max(values),
        )

    def minus(self, other: Percentiles) -> Difference:
        return Difference(
            p50=self.p50 - other.p50, p95=self.p95 - other.p95, p99=self.p99 - other.p99
        )


@dataclass(frozen=True)
class Difference:
    """Percentile by percentile, one distribution minus another (ms)."""

    p50: float
    p95: float
    p99: float


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan
