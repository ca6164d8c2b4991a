"""Operator actions on API keys, for the HTTP API and the command line alike."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from inferq import keys
from inferq.db import make_sync_engine, sync_sessions
from inferq.models import ApiKey


@dataclass(frozen=True, slots=True)
class CreatedKey:
    row: ApiKey  # holds the secret's digest, never the secret
    secret: str  # shown to its owner once


def new_key(name: str, tenant: str, admin: bool) -> CreatedKey:
    """A new key's row, not yet stored, and its secret."""
    new = keys.generate()
    row = ApiKey(name=name, tenant=tenant, admin=admin, prefix=new.prefix, secret_sha256=new.digest)
    return CreatedKey(row, new.secret)


def create_key(database_url: str, name: str, tenant: str, admin: bool) -> str:
    """Store a new key (the command line) and return its secret."""
    created = new_key(name, tenant, admin)
    engine = make_sync_engine(database_url, pool_size=1)
    try:
        with sync_sessions(engine).begin() as session:
            session.add(created.row)
    finally:
        engine.dispose()
    return created.secret


async def create_key_async(
    session: AsyncSession, name: str, tenant: str, admin: bool
) -> CreatedKey:
    """Add a new key in the caller's transaction (the API, whose edge commits)."""
    created = new_key(name, tenant, admin)
    session.add(created.row)
    await session.flush()
    return created
