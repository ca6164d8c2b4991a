"""Bearer API keys: looked up by sha256 digest, cached briefly per process."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select

from api.errors import Unauthorized
from api.state import AppState
from inferq import keys
from inferq.models import ApiKey

CACHE_SECONDS = 10.0
BOOTSTRAP_TENANT = "default"
# Longer than any key inferq makes; a longer "key" is refused without a lookup.
MAX_SECRET_CHARS = 256
CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: which key, which tenant, whether it may administer."""

    key_id: uuid.UUID | None
    name: str
    tenant: str
    admin: bool


def bearer_secret(credentials: str | None) -> str:
    """The secret of `Authorization: Bearer <secret>`, given as what follows the scheme."""
    secret = (credentials or "").strip()
    if not secret:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", CHALLENGE)
    # Keys are printable ASCII; anything else cannot match one (and must not reach a
    # comparison or a query as text it cannot represent).
    if len(secret) > MAX_SECRET_CHARS or not (secret.isascii() and secret.isprintable()):
        raise Unauthorized("invalid API key", CHALLENGE)
    return secret


def _is_bootstrap(state: AppState, secret: str) -> bool:
    bootstrap = state.settings.bootstrap_key
    if bootstrap is None:
        return False
    # Bytes: compare_digest refuses str holding anything but ASCII.
    return hmac.compare_digest(secret.encode(), bootstrap.get_secret_value().encode())


async def authenticate(state: AppState, secret: str) -> Principal:
    if _is_bootstrap(state, secret):
        return Principal(None, "bootstrap", BOOTSTRAP_TENANT, True)
    digest = keys.digest(secret)
    cached = state.key_cache.get(digest)
    if cached is not None and cached[1] > time.monotonic():
        return cached[0]  # type: ignore[no-any-return]
    principal = await _shared_lookup(state, digest)
    if principal is None:
        raise Unauthorized("invalid API key", CHALLENGE)
    state.key_cache[digest] = (principal, time.monotonic() + CACHE_SECONDS)
    return principal


async def _shared_lookup(state: AppState, digest: str) -> Principal | None:
    """One query for every concurrent request carrying the same uncached key.

    A burst from a key on its first use would otherwise send one identical query per
    request, each waiting for a pooled connection.
    """
    lookup = state.key_lookups.get(digest)
    if lookup is None:
        lookup = asyncio.ensure_future(_lookup(state, digest))
        state.key_lookups[digest] = lookup
        lookup.add_done_callback(lambda _: state.key_lookups.pop(digest, None))
    # Shielded: one caller going away must not cancel the others' lookup.
    return await asyncio.shield(lookup)


async def _lookup(state: AppState, digest: str) -> Principal | None:
    # A connection of its own, returned at once: a request must not hold a pooled
    # connection while it waits for another (the batched insert of a submit needs one).
    async with state.autocommit.connect() as conn:
        row = (
            await conn.execute(
                select(ApiKey.id, ApiKey.name, ApiKey.tenant, ApiKey.admin).where(
                    ApiKey.secret_sha256 == digest, ApiKey.revoked_at.is_(None)
                )
            )
        ).first()
    return None if row is None else Principal(row.id, row.name, row.tenant, row.admin)
