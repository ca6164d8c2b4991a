"""Operator actions on API keys, for the HTTP API and the command line alike.

Every action takes a `scope`: the tenant whose keys it may touch, or None for every tenant
(the bootstrap key, and the command line, which holds the database's own credentials).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import Select, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from inferq import keys
from inferq.db import make_sync_engine, sync_sessions
from inferq.judge import RESERVED_TENANT_PREFIX, is_reserved_tenant
from inferq.models import ApiKey


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's limits; None: unlimited in that respect."""

    rate_limit_per_minute: int | None = None
    tokens_per_minute: int | None = None
    daily_budget_usd: Decimal | None = None
    max_queued: int | None = None


LIMIT_NAMES = tuple(f.name for f in fields(Limits))
# What a change may touch: a key's tenant, admin flag and secret are fixed at creation.
EDITABLE = ("name", *LIMIT_NAMES)


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """The fields to change (`given`), to their new values; a limit given as None is cleared."""

    given: frozenset[str]
    name: str | None = None
    rate_limit_per_minute: int | None = None
    tokens_per_minute: int | None = None
    daily_budget_usd: Decimal | None = None
    max_queued: int | None = None

    def __post_init__(self) -> None:
        unknown = self.given - set(EDITABLE)
        if unknown:
            raise ValueError(f"not editable: {', '.join(sorted(unknown))}")
        if "name" in self.given and not self.name:
            raise ValueError("a key's name cannot be empty")

    def values(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.given}


@dataclass(frozen=True, slots=True)
class CreatedKey:
    row: ApiKey  # holds the secret's digest, never the secret
    secret: str  # shown to its owner once


def new_key(name: str, tenant: str, admin: bool, limits: Limits | None = None) -> CreatedKey:
    """A new key's row, not yet stored, and its secret."""
    if is_reserved_tenant(tenant):
        raise ValueError(f"tenant names starting with {RESERVED_TENANT_PREFIX!r} are reserved")
    new = keys.generate()
    row = ApiKey(
        name=name,
        tenant=tenant,
        admin=admin,
        prefix=new.prefix,
        secret_sha256=new.digest,
        **asdict(limits or Limits()),
    )
    return CreatedKey(row, new.secret)


# --- queries (both sides) -------------------------------------------------------------------


def _scoped(query: Select[ApiKey], scope: str | None) -> Select[ApiKey]:
    return query if scope is None else query.where(ApiKey.tenant == scope)


def _page(scope: str | None, after: ApiKey | None, limit: int) -> Select[ApiKey]:
    """Newest first; `after` is the last key of the previous page."""
    query = _scoped(select(ApiKey), scope)
    if after is not None:
        query = query.where(tuple_(ApiKey.created_at, ApiKey.id) < (after.created_at, after.id))
    return query.order_by(ApiKey.created_at.desc(), ApiKey.id.desc()).limit(limit)


def _one(scope: str | None, key_id: uuid.UUID) -> Select[ApiKey]:
    return _scoped(select(ApiKey).where(ApiKey.id == key_id), scope).with_for_update()


def _revoke(row: ApiKey) -> None:
    # Idempotent: a key revoked before keeps the time it was revoked at.
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)


def _change(row: ApiKey, changes: KeyChanges) -> None:
    for name, value in changes.values().items():
        setattr(row, name, value)


# --- the API: in the request's transaction, which its edge commits --------------------------


async def create_key_async(
    session: AsyncSession, name: str, tenant: str, admin: bool, limits: Limits | None = None
) -> CreatedKey:
    created = new_key(name, tenant, admin, limits)
    session.add(created.row)
    await session.flush()
    return created


async def get_key_async(
    session: AsyncSession, scope: str | None, key_id: uuid.UUID
) -> ApiKey | None:
    """The key, if it is within `scope`: another tenant's key is as good as missing."""
    return await session.scalar(_scoped(select(ApiKey).where(ApiKey.id == key_id), scope))


async def list_keys_async(
    session: AsyncSession, scope: str | None, after: ApiKey | None, limit: int
) -> list[ApiKey]:
    return list(await session.scalars(_page(scope, after, limit)))


async def update_key_async(
    session: AsyncSession, scope: str | None, key_id: uuid.UUID, changes: KeyChanges
) -> ApiKey | None:
    row = await session.scalar(_one(scope, key_id))
    if row is not None:
        _change(row, changes)
        await session.flush()
    return row


async def revoke_key_async(
    session: AsyncSession, scope: str | None, key_id: uuid.UUID
) -> ApiKey | None:
    row = await session.scalar(_one(scope, key_id))
    if row is not None:
        _revoke(row)
        await session.flush()
    return row


# --- the command line: a short-lived engine per command --------------------------------------


@contextmanager
def _session(database_url: str) -> Iterator[Session]:
    engine = make_sync_engine(database_url, pool_size=1)
    try:
        with sync_sessions(engine).begin() as session:
            yield session
    finally:
        engine.dispose()


def create_key(
    database_url: str, name: str, tenant: str, admin: bool, limits: Limits | None = None
) -> str:
    """Store a new key and return its secret."""
    created = new_key(name, tenant, admin, limits)
    with _session(database_url) as session:
        session.add(created.row)
    return created.secret


def list_keys(database_url: str, tenant: str | None) -> list[ApiKey]:
    """Every key (of `tenant`, if given), newest first."""
    with _session(database_url) as session:
        query = _scoped(select(ApiKey), tenant)
        return list(session.scalars(query.order_by(ApiKey.created_at.desc(), ApiKey.id.desc())))


def update_key(database_url: str, key_id: uuid.UUID, changes: KeyChanges) -> ApiKey | None:
    with _session(database_url) as session:
        row = session.scalar(_one(None, key_id))
        if row is not None:
            _change(row, changes)
            session.flush()
        return row


def revoke_key(database_url: str, key_id: uuid.UUID) -> ApiKey | None:
    with _session(database_url) as session:
        row = session.scalar(_one(None, key_id))
        if row is not None:
            _revoke(row)
            session.flush()
        return row
