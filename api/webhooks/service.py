"""Webhooks on the API side: the tenant's signing secret, and the URL guard at submit."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from api.errors import InvalidRequest
from inferq.settings import Settings
from inferq.webhooks import UnsafeUrl, check_url, insert_secret, select_secret


async def tenant_secret(session: AsyncSession, tenant: str) -> str:
    """The tenant's signing secret, made on first use (the edge commits it)."""
    secret = await session.scalar(select_secret(tenant))
    if secret is None:
        await session.execute(insert_secret(tenant))
        secret = await session.scalar(select_secret(tenant))
    assert secret is not None
    return secret


async def guard_url(url: str, settings: Settings) -> None:
    """A 422 for a webhook URL whose host is not a public address (or does not resolve)."""
    try:
        await check_url(
            url, settings.webhook_allow_private, settings.webhook_resolve_timeout_seconds
        )
    except UnsafeUrl as exc:
        raise InvalidRequest(str(exc)) from exc
