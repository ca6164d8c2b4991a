"""/v1/admin: API keys. An admin key manages its own tenant's keys; the bootstrap key, all."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from api.admin.schemas import KeyCreate, KeyCreated, KeyList, KeyOut, KeyUpdate
from api.auth import Principal
from api.deps import AdminKey, SessionDep, StateDep
from api.errors import Forbidden, InvalidRequest, NotFound
from api.openapi import AUTHENTICATED, error_responses
from inferq import admin

router = APIRouter(prefix="/v1/admin", tags=["admin"])

ADMIN = (*AUTHENTICATED, 403)


def scope_of(key: Principal) -> str | None:
    """The tenant whose keys `key` manages; None: every tenant (the bootstrap key)."""
    return None if key.key_id is None else key.tenant


def tenant_within(key: Principal, tenant: str | None) -> str | None:
    """`tenant` if `key` may manage it (absent: the key's own scope), else a 403."""
    scope = scope_of(key)
    if tenant is None or tenant == scope:
        return scope
    if scope is not None:
        raise Forbidden(f"this admin key manages tenant {scope!r} only")
    return tenant


@router.post("/keys", status_code=201, response_model=KeyCreated, responses=error_responses(*ADMIN))
async def create(body: KeyCreate, key: AdminKey, session: SessionDep) -> KeyCreated:
    """Create an API key (in the caller's tenant unless `tenant` says otherwise); its secret
    is shown in this response only."""
    tenant = tenant_within(key, body.tenant) or key.tenant
    created = await admin.create_key_async(session, body.name, tenant, body.admin, body.limits())
    return KeyCreated(**KeyOut.of(created.row).model_dump(), secret=created.secret)


@router.get("/keys", response_model=KeyList, responses=error_responses(*ADMIN))
async def list_(
    key: AdminKey,
    session: SessionDep,
    tenant: Annotated[str | None, Query(max_length=200)] = None,
    cursor: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> KeyList:
    """The keys the caller manages (of `tenant`, if given), newest first; no secrets."""
    scope = tenant_within(key, tenant)
    after = None
    if cursor is not None:
        after = await admin.get_key_async(session, scope, cursor)
        if after is None:
            raise InvalidRequest(f"cursor: no key {cursor} to continue after")
    rows = await admin.list_keys_async(session, scope, after, limit + 1)
    next_cursor = str(rows[limit - 1].id) if len(rows) > limit else None
    return KeyList(data=[KeyOut.of(row) for row in rows[:limit]], next_cursor=next_cursor)


@router.patch("/keys/{key_id}", response_model=KeyOut, responses=error_responses(*ADMIN, 404))
async def update(key_id: uuid.UUID, body: KeyUpdate, key: AdminKey, session: SessionDep) -> KeyOut:
    """Rename a key or change its limits (null clears one); applies within a few seconds."""
    row = await admin.update_key_async(session, scope_of(key), key_id, body.changes())
    if row is None:
        raise NotFound(f"no key {key_id}")
    return KeyOut.of(row)


@router.delete("/keys/{key_id}", response_model=KeyOut, responses=error_responses(*ADMIN, 404))
async def revoke(key_id: uuid.UUID, key: AdminKey, session: SessionDep, state: StateDep) -> KeyOut:
    """Revoke a key: every API process refuses it within 5 s. Revoking again changes nothing."""
    row = await admin.revoke_key_async(session, scope_of(key), key_id)
    if row is None:
        raise NotFound(f"no key {key_id}")
    state.keys.forget(row.secret_sha256)
    return KeyOut.of(row)
