"""Beat's pass that rolls up closed days for /v1/stats (inferq.stats_rollup)."""

from __future__ import annotations

from inferq.stats_rollup import roll_up
from workers.context import WorkerContext
from workers.passes import start_periodic


def start_rollup(ctx: WorkerContext) -> None:
    start_periodic(
        ctx, "stats-rollup", lambda: ctx.settings.stats_rollup_seconds, lambda: roll_up(ctx.engine)
    )
