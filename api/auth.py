"""Bearer API keys: looked up by sha256 digest, cached briefly per process."""

from __future__ import annotations

import hmac
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.errors import Unauthorized
from api.state import AppState
from inferq import keys
from inferq.models import ApiKey

CACHE_SECONDS = 10.0
BOOTSTRAP_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: which key, which tenant, whether it may administer."""

    key_id: uuid.UUID | None
    name: str
    tenant: str
    admin: bool


def bearer_secret(authorization: str | None) -> str:
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return secret.strip()


async def authenticate(state: AppState, session: AsyncSession, secret: str) -> Principal:
    bootstrap = state.settings.bootstrap_key
    if bootstrap is not None and hmac.compare_digest(secret, bootstrap.get_secret_value()):
        return Principal(None, "bootstrap", BOOTSTRAP_TENANT, True)
    digest = keys.digest(secret)
    cached = state.key_cache.get(digest)
    if cached is not None and cached[1] > time.monotonic():
        return cached[0]
    row = await session.scalar(
        select(ApiKey).where(ApiKey.secret_sha256 == digest, ApiKey.revoked_at.is_(None))
    )
    if row is None:
        raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})
    principal = Principal(row.id, row.name, row.tenant, row.admin)
    state.key_cache[digest] = (principal, time.monotonic() + CACHE_SECONDS)
    return principal
