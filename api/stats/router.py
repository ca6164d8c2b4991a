"""/v1/stats: the caller's tenant's figures over a range of days, grouped."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import CurrentKey, SessionDep
from api.openapi import error_responses
from api.stats import service
from api.stats.schemas import StatsList, StatsRowOut
from inferq.stats import DEFAULT_DAYS, GROUPS, MAX_DAYS

router = APIRouter(prefix="/v1/stats", tags=["stats"])

DESCRIPTION = (
    "Jobs, outcomes, tokens, cost, cache hits, feedback, judge scores and timing percentiles "
    "of the caller's tenant, one row per group (one row when nothing is grouped). A job "
    "counts on the UTC day it was created; a judge's own jobs never count. "
    f"At most {MAX_DAYS} days at once."
)


@router.get(
    "",
    response_model=StatsList,
    response_model_exclude_unset=True,
    responses=error_responses(401, 422, 503),
    description=DESCRIPTION,
)
async def stats(
    key: CurrentKey,
    session: SessionDep,
    first: Annotated[
        str | None,
        Query(
            alias="from",
            max_length=100,
            description=f"first UTC day, YYYY-MM-DD (default: {DEFAULT_DAYS - 1} days before to)",
        ),
    ] = None,
    last: Annotated[
        str | None,
        Query(alias="to", max_length=100, description="last UTC day, inclusive (default: today)"),
    ] = None,
    group_by: Annotated[
        str | None,
        Query(max_length=100, description=f"comma-separated, any of {', '.join(GROUPS)}"),
    ] = None,
) -> StatsList:
    query = service.stats_query(key.tenant, first, last, group_by)
    rows = await service.tenant_stats(session, query)
    return StatsList(data=[StatsRowOut.of(row, query.group_by) for row in rows])
