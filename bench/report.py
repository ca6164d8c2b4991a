"""bench.json, the printed tables and the stream-latency chart."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from bench.stats import Difference, Percentiles
from bench.submit import KeyUse, SubmitLevel

if TYPE_CHECKING:
    from bench.runner import BenchResult
    from bench.stream import StreamResult

JSON_FILE = "bench.json"
CHART_FILE = "stream-latency.png"


def _clean(value: Any) -> Any:
    """JSON has no NaN: missing figures become null."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json(result: BenchResult) -> str:
    return json.dumps(_clean(dataclasses.asdict(result)), indent=2)


def write(result: BenchResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_FILE).write_text(to_json(result) + "\n")
    if result.stream is not None:
        chart(result.stream, out_dir / CHART_FILE)


def chart(result: StreamResult, path: Path) -> None:
    """TTFT and ITL, p50 and p99, platform against direct, across concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [level.concurrency for level in result.levels]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in (
        (axes[0], "ttft_ms", "time to first token"),
        (axes[1], "itl_ms", "inter-token latency"),
    ):
        for route, color in (("platform", "tab:red"), ("direct", "tab:blue")):
            for q, style in (("p50", "-"), ("p99", "--")):
                ys = [getattr(getattr(getattr(lvl, route), metric), q) for lvl in result.levels]
                ax.plot(xs, ys, style, color=color, marker="o", label=f"{route} {q}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("ms")
        if metric == "ttft_ms":
            ax.set_yscale("log")  # the platform's TTFT may run to seconds under load
        else:
            ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("inferq stream latency: platform vs simulator direct")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _triples(*distributions: Percentiles | Difference) -> list[str]:
    """p50, p95, p99 of each distribution, in a row."""
    return [_ms(getattr(d, q)) for d in distributions for q in ("p50", "p95", "p99")]


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0"


def print_tables(result: BenchResult, console: Console) -> None:
    for table in _tables(result):
        console.print(table)


def _tables(result: BenchResult) -> list[Table]:
    tables = []
    if result.stream is not None:
        tables.append(stream_table(result.stream))
    if result.submit is not None:
        tables.append(submit_table(result))
        tables.append(submit_keys_table(result))
        if any(level.keys != "mixed" for level in result.submit.levels):
            tables.append(submit_limits_table(result))
    if result.fanout is not None:
        tables.append(fanout_table(result))
    if result.scale is not None:
        tables.append(scale_table(result))
    if result.fairness is not None:
        tables.append(fairness_table(result))
    if result.relay is not None:
        tables.append(relay_table(result))
    tables.append(cpu_table(result))
    tables.append(targets_table(result))
    return tables


def stream_table(result: StreamResult) -> Table:
    table = Table(title="stream: platform vs direct (ms; Δ = platform - direct)")
    for column in (
        "C",
        "path",
        "submit p50",
        "TTFT p50",
        "p95",
        "p99",
        "ITL p50",
        "p95",
        "p99",
        "E2E p50",
        "p95",
        "p99",
        "tok/s",
        "bench CPU",
        "errors",
    ):
        table.add_column(column, justify="right")
    for level in result.levels:
        for name, path in (("direct", level.direct), ("platform", level.platform)):
            table.add_row(
                str(level.concurrency),
                name,
                _ms(path.submit_ms.p50),
                *_triples(path.ttft_ms, path.itl_ms, path.e2e_ms),
                f"{path.tokens_per_s:.0f}",
                f"{path.client_cpu_share:.2f}",
                _errors(path.errors),
            )
        o = level.overhead
        table.add_row(
            "",
            "Δ / ratio",
            "",
            *_triples(o.ttft_ms, o.itl_ms, o.e2e_ms),
            f"x{o.tokens_per_s_ratio:.3f}",
            "",
            "",
            end_section=True,
        )
    return table


def submit_table(result: BenchResult) -> Table:
    assert result.submit is not None
    table = Table(title=f"submit: {result.submit.note}")
    columns = (
        "API processes",
        "submitters",
        "jobs",
        "jobs/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "bench CPU",
        "errors",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for level in _mixed(result.submit.levels):
        lat = level.latency_ms
        table.add_row(
            str(level.api_processes),
            str(level.concurrency),
            str(level.accepted),
            f"{level.jobs_per_s:.0f}",
            _ms(lat.p50),
            _ms(lat.p95),
            _ms(lat.p99),
            f"{level.client_cpu_share:.2f}",
            _errors(level.errors),
        )
    return table


def _mixed(levels: list[SubmitLevel]) -> list[SubmitLevel]:
    return [level for level in levels if level.keys == "mixed"]


def limits_ratio(levels: list[SubmitLevel]) -> dict[tuple[int, int], dict[str, float]]:
    """Jobs/s with and without limits on the key, summed over the rounds, by (API processes,
    clients); `ratio` is limits ÷ no limits."""
    sums: dict[tuple[int, int], dict[str, list[float]]] = {}
    for level in levels:
        if level.keys == "mixed":
            continue
        kinds = sums.setdefault((level.api_processes, level.concurrency), {})
        jobs, wall = kinds.setdefault(level.keys, [0.0, 0.0])
        kinds[level.keys] = [jobs + level.accepted, wall + level.wall_s]
    rates = {}
    for where, kinds in sums.items():
        plain, limited = (kinds.get(k, [0.0, 0.0]) for k in ("no limits", "limits"))
        without = plain[0] / plain[1] if plain[1] else 0.0
        with_ = limited[0] / limited[1] if limited[1] else 0.0
        ratio = with_ / without if without else 0.0
        rates[where] = {"no limits": without, "limits": with_, "ratio": ratio}
    return rates


def submit_limits_table(result: BenchResult) -> Table:
    """What checking a key's limits costs the front door (bar: ratio ≥ 0.90)."""
    assert result.submit is not None
    table = Table(
        title="submit with limits: known keys without limits and with every limit set"
        " (never reached), in turn; jobs/s over all rounds"
    )
    columns = ("API processes", "submitters", "jobs/s no limits", "jobs/s limits", "ratio")
    for column in columns:
        table.add_column(column, justify="right")
    for (processes, clients), rates in limits_ratio(result.submit.levels).items():
        table.add_row(
            str(processes),
            str(clients),
            f"{rates['no limits']:.0f}",
            f"{rates['limits']:.0f}",
            f"{rates['ratio']:.3f}",
        )
    return table


def submit_keys_table(result: BenchResult) -> Table:
    """The same submits by the key they carried: p50 / p99 ms, and errors."""
    assert result.submit is not None
    uses = list(KeyUse)
    table = Table(
        title="submit by key: p50 / p99 ms (bootstrap; API keys used before the level;"
        " new keys made before the level, first used in it)"
    )
    for column in ("API processes", "submitters", "new keys", *uses, "errors"):
        table.add_column(column, justify="right")
    for level in _mixed(result.submit.levels):
        cells = []
        for use in uses:
            figures = level.by_key.get(use.value)
            lat = figures.latency_ms if figures else None
            cells.append(f"{_ms(lat.p50)} / {_ms(lat.p99)} ({lat.n})" if lat else "-")
        errors = {
            f"{use}: {kind}": count
            for use, figures in level.by_key.items()
            for kind, count in figures.errors.items()
        }
        table.add_row(
            str(level.api_processes),
            str(level.concurrency),
            str(level.new_keys),
            *cells,
            _errors(errors),
        )
    return table


def fanout_table(result: BenchResult) -> Table:
    f = result.fanout
    assert f is not None
    table = Table(title="fan-out: SSE clients on one API process")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("clients (target)", str(f.target_clients)),
        ("connections held (≥1 event, open to the end)", str(f.connections_held)),
        ("  of which had an event by the end of the ramp", str(f.held_at_hold_start)),
        ("jobs streaming / client processes", f"{f.jobs} / {f.client_processes}"),
        (
            "API resident memory before → peak (MiB)",
            f"{f.api_rss_before_mib} → {f.api_rss_peak_mib}",
        ),
        (
            "delivery lag p50 / p95 / p99 (ms)",
            " / ".join(_triples(f.delivery_lag_ms)),
        ),
        ("lag samples", str(f.delivery_lag_ms.n)),
        ("client CPU share per process", ", ".join(str(s) for s in f.client_cpu_share)),
        ("errors", _errors(f.errors)),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def scale_table(result: BenchResult) -> Table:
    assert result.scale is not None
    table = Table(title="scale: workers with their own simulators on one queue")
    for column in ("workers", "jobs", "succeeded", "span s", "jobs/s", "tok/s", "efficiency"):
        table.add_column(column, justify="right")
    for level in result.scale.levels:
        table.add_row(
            str(level.workers),
            str(level.jobs),
            str(level.succeeded),
            f"{level.span_s:.2f}",
            f"{level.jobs_per_s:.1f}",
            f"{level.tokens_per_s:.0f}",
            f"{level.efficiency:.3f}",
        )
    return table


def fairness_table(result: BenchResult) -> Table:
    fair = result.fairness
    assert fair is not None
    table = Table(title="fairness: one tenant's flood, then another tenant's one job")
    columns = ("flood jobs", "slots", "job s", "B waited s", "A p50 wait s", "A last wait s")
    for column in (*columns, "B / A last"):
        table.add_column(column, justify="right")
    table.add_row(
        str(fair.flood_jobs),
        str(fair.worker_slots),
        f"{fair.job_s:.3f}",
        f"{fair.light_wait_s:.3f}",
        f"{fair.flood_wait_p50_s:.2f}",
        f"{fair.flood_wait_max_s:.2f}",
        f"{fair.light_vs_backlog:.3f}",
    )
    return table


def relay_table(result: BenchResult) -> Table:
    relay = result.relay
    assert relay is not None
    first, warm = relay.first_burst, relay.warm_burst
    table = Table(
        title=f"relay: one worker ({relay.worker_processes} processes, {relay.worker_concurrency}"
        f" threads) against a fast backend, {relay.output_tokens} tokens a reply",
        caption=f"tokens relayed per second of worker CPU: {relay.tokens_per_worker_core_s:,.0f}"
        f" (bare reader: {relay.bare_tokens_per_core_s:,.0f}). First burst of {first.streams}"
        f" streams on the fresh worker, TTFT p50 / p99: {_ms(first.ttft_ms.p50)} /"
        f" {_ms(first.ttft_ms.p99)} ms (submit p50 {_ms(first.submit_ms.p50)} ms); warm:"
        f" {_ms(warm.ttft_ms.p50)} / {_ms(warm.ttft_ms.p99)} ms (submit p50"
        f" {_ms(warm.submit_ms.p50)} ms); x{relay.first_over_warm_p50:.2f} /"
        f" x{relay.first_over_warm_p99:.2f}",
    )
    columns = (
        "C",
        "ITL ms",
        "tok/s direct",
        "tok/s platform",
        "ratio",
        "TTFT p50 direct → platform",
        "p99",
        "TTFT added p50 / p99",
        "worker cores",
        "worker µs/token",
        "tokens per worker core-s",
        "bare µs/token",
        "worker ÷ bare",
        "API µs/token",
        "errors",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for level in relay.levels:
        d, p = level.direct, level.platform
        table.add_row(
            str(level.clients),
            f"{level.itl_ms:g}",
            f"{d.tokens_per_s:,.0f}",
            f"{p.tokens_per_s:,.0f}",
            f"{level.tokens_per_s_ratio:.3f}",
            f"{_ms(d.ttft_ms.p50)} → {_ms(p.ttft_ms.p50)}",
            f"{_ms(d.ttft_ms.p99)} → {_ms(p.ttft_ms.p99)}",
            f"{_ms(level.ttft_added_ms.p50)} / {_ms(level.ttft_added_ms.p99)}",
            f"{level.worker_cores:.2f}",
            f"{level.worker_cpu_us_per_token:.0f}",
            f"{level.tokens_per_worker_core_s:,.0f}",
            f"{level.bare.cpu_us_per_token:.0f}",
            f"x{level.worker_over_bare:.1f}",
            f"{level.api_cpu_us_per_token:.0f}",
            _errors(p.errors),
        )
    return table


def cpu_table(result: BenchResult) -> Table:
    end = result.speed_probe_ms.get("end")
    table = Table(
        title="CPU by phase (cores used on average; the machine has "
        f"{result.environment.cpu_count})",
        caption="speed probe: a fixed piece of Python work timed before the phase, platform idle"
        " (ms, lower is faster)"
        + (f"; {end:.1f} ms at the end" if end is not None else "")
        + ". stolen: cores the hypervisor gave to others while this machine waited",
    )
    columns = ("phase", "speed probe ms", "wall s", "machine busy", "stolen", "busiest processes")
    for column in columns:
        table.add_column(column)
    for phase, usage in result.cpu.items():
        top = ", ".join(f"{role} {cores}" for role, cores in usage.top(5))
        probe = result.speed_probe_ms.get(phase)
        table.add_row(
            phase,
            "-" if probe is None else f"{probe:.1f}",
            f"{usage.wall_s:.0f}",
            f"{usage.cores_busy:.2f}",
            f"{usage.cores_stolen:.2f}",
            top,
        )
    return table


def targets_table(result: BenchResult) -> Table:
    table = Table(title="targets")
    for column in ("target", "measured", "met"):
        table.add_column(column)
    marks = {True: "[green]yes", False: "[red]no", None: "-"}
    for check in result.targets:
        table.add_row(check.target, check.measured, marks[check.met])
    return table
