"""/v1/admin: API keys."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import AdminKey, SessionDep
from inferq.admin import create_key_async

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    tenant: str = Field("default", min_length=1, max_length=200)
    admin: bool = False


class KeyCreated(BaseModel):
    id: uuid.UUID
    name: str
    tenant: str
    admin: bool
    prefix: str
    secret: str


@router.post("/keys", status_code=201, response_model=KeyCreated)
async def create(body: KeyCreate, _: AdminKey, session: SessionDep) -> KeyCreated:
    """Create an API key; its secret is shown in this response only."""
    created = await create_key_async(session, body.name, body.tenant, body.admin)
    row = created.row
    return KeyCreated(
        id=row.id,
        name=row.name,
        tenant=row.tenant,
        admin=row.admin,
        prefix=row.prefix,
        secret=created.secret,
    )
