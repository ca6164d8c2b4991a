"""/v1/admin: API keys."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import AdminKey, SessionDep
from inferq import keys
from inferq.models import ApiKey

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


async def create_key(session: AsyncSession, name: str, tenant: str, admin: bool) -> KeyCreated:
    new = keys.generate()
    row = ApiKey(name=name, tenant=tenant, admin=admin, prefix=new.prefix, secret_sha256=new.digest)
    session.add(row)
    await session.flush()
    return KeyCreated(
        id=row.id, name=name, tenant=tenant, admin=admin, prefix=new.prefix, secret=new.secret
    )


@router.post("/keys", status_code=201, response_model=KeyCreated)
async def create(body: KeyCreate, _: AdminKey, session: SessionDep) -> KeyCreated:
    """Create an API key; its secret is shown in this response only."""
    return await create_key(session, body.name, body.tenant, body.admin)
