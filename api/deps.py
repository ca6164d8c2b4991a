"""Request dependencies, named so that signatures read as sentences."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from api.auth import Principal, bearer_secret
from api.errors import Forbidden
from api.state import AppState
from inferq.registry import Registry
from inferq.settings import Settings


# Every dependency is `async def`: FastAPI runs a plain `def` dependency in a worker thread,
# which costs a thread hand-off (and a slot of a 40-thread pool) on every request.
async def get_state(request: Request) -> AppState:
    return request.app.state.inferq  # type: ignore[no-any-return]


StateDep = Annotated[AppState, Depends(get_state)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    """One session per request; the edge commits on success and rolls back on error.

    Only a session with a transaction open is committed: a request that commits itself
    leaves none, and an empty commit still costs SQLAlchemy a transaction object, about as
    much as the session itself. The hot routes (a submit, an event stream) take no session
    at all: they open one only in the cases that read or write through it.
    """
    async with state.sessions() as session:
        try:
            yield session
            if session.in_transaction():
                await session.commit()
        except BaseException:
            await session.rollback()
            raise


# Scoped to the endpoint call: the transaction ends before the response is sent, so a
# streaming response never holds a database connection.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_registry(state: StateDep) -> Registry:
    return state.registry


async def get_redis(state: StateDep) -> aioredis.Redis:
    return state.redis


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
RedisDep = Annotated[aioredis.Redis, Depends(get_redis)]


# Declares the bearer scheme in the OpenAPI document (the Authorize button of /docs);
# auto_error=False so that a missing key is this API's own 401 envelope, not FastAPI's 403.
bearer = HTTPBearer(auto_error=False, description="An inferq API key: `Bearer iq_...`")


async def current_key(
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller's key, looked up on a connection of its own (not the request's session)."""
    secret = credentials.credentials if credentials is not None else None
    return await state.keys.authenticate(bearer_secret(secret))


CurrentKey = Annotated[Principal, Depends(current_key)]


async def admin_key(key: CurrentKey) -> Principal:
    if not key.admin:
        raise Forbidden("this call needs an admin key")
    return key


AdminKey = Annotated[Principal, Depends(admin_key)]
