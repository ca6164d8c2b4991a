"""Operator actions outside the HTTP API."""

from __future__ import annotations

from inferq import keys
from inferq.db import make_sync_engine, sync_sessions
from inferq.models import ApiKey


def create_key(database_url: str, name: str, tenant: str, admin: bool) -> str:
    """Store a new key's digest and return its secret."""
    new = keys.generate()
    engine = make_sync_engine(database_url, pool_size=1)
    try:
        with sync_sessions(engine).begin() as session:
            session.add(
                ApiKey(
                    name=name,
                    tenant=tenant,
                    admin=admin,
                    prefix=new.prefix,
                    secret_sha256=new.digest,
                )
            )
    finally:
        engine.dispose()
    return new.secret
