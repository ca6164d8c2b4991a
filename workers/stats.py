"""Beat's pass that rolls up closed days for /v1/stats (inferq.stats_rollup)."""

from __future__ import annotations

from inferq.stats import MAX_DAYS
from inferq.stats_rollup import RECENT_DAYS, roll_up
from workers.context import WorkerContext
from workers.passes import start_periodic


class Rollup:
    """The first pass after beat starts looks back over the longest range /v1/stats answers
    (days that closed while beat was down); later passes over the last few days."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.days = MAX_DAYS

    def __call__(self) -> int:
        rolled = roll_up(self.ctx.engine, days=self.days)
        self.days = RECENT_DAYS
        return rolled


def start_rollup(ctx: WorkerContext) -> None:
    start_periodic(ctx, "stats-rollup", lambda: ctx.settings.stats_rollup_seconds, Rollup(ctx))
