"""`inferq stats`: the figures of `GET /v1/stats` as a table in the terminal (or its JSON)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from inferq.client import call_api, print_error
from inferq.stats import TIMINGS

# Each timing in one cell: p50/p95/p99.
TIMING_HEADERS = {
    "queue_ms": "queue ms",
    "ttft_ms": "ttft ms",
    "duration_ms": "duration ms",
    "tokens_per_second": "tokens/s",
}
COUNTS = ("jobs", "succeeded", "failed", "cancelled", "expired", "input_tokens", "output_tokens")


def print_stats(
    url: str, key: str, first: str | None, last: str | None, group_by: str, as_json: bool
) -> int:
    params = {name: value for name, value in (("from", first), ("to", last)) if value}
    if group_by:
        params["group_by"] = group_by

    def show(http: httpx.Client) -> int:
        response = http.get("/v1/stats", params=params)
        if response.status_code >= 400:
            return print_error(response)
        rows = response.json()["data"]
        print(json.dumps(rows, indent=2) if as_json else stats_table(rows, _groups(group_by)))
        return 0

    return call_api(url, key, 60, show)


def _groups(group_by: str) -> list[str]:
    """The group columns, each once, as the API groups (`model,model` is by model)."""
    return list(dict.fromkeys(name.strip() for name in group_by.split(",") if name.strip()))


def stats_table(rows: list[dict[str, Any]], groups: list[str]) -> str:
    """One line per row: its group fields, then every figure; `-` where there is none."""
    headers = [
        *groups,
        *COUNTS,
        "cost usd",
        "cache hits",
        "cache %",
        "error %",
        "up",
        "down",
        "judge",
        *(f"{TIMING_HEADERS[name]} p50/p95/p99" for name in TIMINGS),
    ]
    lines = [headers] + [_cells(row, groups) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    first = len(groups)  # group fields to the left, figures to the right
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i < first else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def _cells(row: dict[str, Any], groups: list[str]) -> list[str]:
    return [
        *(_group_cell(row.get(name)) for name in groups),
        *(f"{row[name]:,}" for name in COUNTS),
        f"{row['cost_usd']:.6f}",
        f"{row['cache_hits']:,}",
        f"{row['cache_hit_rate'] * 100:.1f}",
        f"{row['error_rate'] * 100:.1f}",
        str(row["feedback"]["up"]),
        str(row["feedback"]["down"]),
        _number(row["judge_score_avg"], 2),
        *("/".join(_number(row[name][p], 1) for p in ("p50", "p95", "p99")) for name in TIMINGS),
    ]


def _group_cell(value: Any) -> str:
    if isinstance(value, dict):  # a key: its name, or its id when it has none
        return str(value.get("name") or value.get("id"))
    return "-" if value is None else str(value)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
