"""`/v1/stats` on the API side: the request's range and grouping, then the kernel's query."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from api.errors import InvalidRequest, ServiceUnavailable
from inferq.stats import (
    StatsParamError,
    StatsQuery,
    StatsRow,
    parse_group_by,
    parse_range,
    read_stats,
)

QUERY_CANCELED = "57014"  # Postgres's SQLSTATE for a statement over its timeout


def stats_query(
    tenant: str, first: str | None, last: str | None, group_by: str | None
) -> StatsQuery:
    """The query the parameters ask for, or a 422 saying what is wrong with them."""
    try:
        first_day, last_day = parse_range(first, last, datetime.now(UTC).date())
        return StatsQuery(tenant, first_day, last_day, parse_group_by(group_by))
    except StatsParamError as exc:
        raise InvalidRequest(str(exc)) from None


async def tenant_stats(session: AsyncSession, query: StatsQuery) -> list[StatsRow]:
    try:
        return await read_stats(session, query)
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != QUERY_CANCELED:
            raise
        raise ServiceUnavailable(
            "the stats query ran over its time limit; ask for fewer days"
        ) from None
