"""Bearer API keys: looked up by sha256 digest, cached briefly per process."""

from __future__ import annotations

import asyncio
import hmac
import uuid
from dataclasses import dataclass

from cachetools import TTLCache
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from api.errors import Unauthorized
from inferq import keys
from inferq.limits import KeyLimits
from inferq.models import ApiKey

# A revoked key must be refused within 5 s on every API replica, and nothing tells a replica
# of a revocation: each forgets a key this long after looking it up. Below 5 s, so that a
# lookup already under way when the key is revoked is forgotten in time too.
CACHE_SECONDS = 4.0
# Keys remembered per process; past this the oldest are dropped (and looked up again).
CACHE_KEYS = 50_000
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
    limits: KeyLimits | None = None  # as of the lookup: a change applies within CACHE_SECONDS


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


class KeyRing:
    """Who a secret belongs to: the bootstrap key, or a stored key that is not revoked."""

    def __init__(self, autocommit: AsyncEngine, bootstrap: SecretStr | None) -> None:
        self._autocommit = autocommit
        self._bootstrap = None if bootstrap is None else bootstrap.get_secret_value().encode()
        self._cache: TTLCache[str, Principal] = TTLCache(CACHE_KEYS, ttl=CACHE_SECONDS)
        # Lookups under way, by digest: concurrent requests with one cold key share one.
        self._lookups: dict[str, asyncio.Future[Principal | None]] = {}

    async def authenticate(self, secret: str) -> Principal:
        if self._is_bootstrap(secret):
            return Principal(None, "bootstrap", BOOTSTRAP_TENANT, True)
        digest = keys.digest(secret)
        cached = self._cache.get(digest)
        if cached is not None:
            return cached
        principal = await self._shared_lookup(digest)
        if principal is None:
            raise Unauthorized("invalid API key", CHALLENGE)
        self._cache[digest] = principal
        return principal

    def forget(self, digest: str) -> None:
        """Drop a changed or revoked key, so that this process looks it up again at once
        (the others do when their entry expires)."""
        self._cache.pop(digest, None)

    def _is_bootstrap(self, secret: str) -> bool:
        if self._bootstrap is None:
            return False
        # Bytes: compare_digest refuses str holding anything but ASCII.
        return hmac.compare_digest(secret.encode(), self._bootstrap)

    async def _shared_lookup(self, digest: str) -> Principal | None:
        """One query for every concurrent request carrying the same uncached key.

        A burst from a key on its first use would otherwise send one identical query per
        request, each waiting for a pooled connection.
        """
        lookup = self._lookups.get(digest)
        if lookup is None:
            lookup = asyncio.ensure_future(self._lookup(digest))
            self._lookups[digest] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(digest, None))
        # Shielded: one caller going away must not cancel the others' lookup.
        return await asyncio.shield(lookup)

    async def _lookup(self, digest: str) -> Principal | None:
        # A connection of its own, returned at once: a request must not hold a pooled
        # connection while it waits for another (the batched insert of a submit needs one).
        async with self._autocommit.connect() as conn:
            row = (
                await conn.execute(
                    select(*_PRINCIPAL_COLUMNS).where(
                        ApiKey.secret_sha256 == digest, ApiKey.revoked_at.is_(None)
                    )
                )
            ).first()
        if row is None:
            return None
        limits = KeyLimits.of(
            row.rate_limit_per_minute, row.tokens_per_minute, row.daily_budget_usd, row.max_queued
        )
        return Principal(row.id, row.name, row.tenant, row.admin, limits)


_PRINCIPAL_COLUMNS = (
    ApiKey.id,
    ApiKey.name,
    ApiKey.tenant,
    ApiKey.admin,
    ApiKey.rate_limit_per_minute,
    ApiKey.tokens_per_minute,
    ApiKey.daily_budget_usd,
    ApiKey.max_queued,
)
