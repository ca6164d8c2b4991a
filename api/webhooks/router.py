"""/v1/webhooks: the signing secret of the caller's tenant."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import CurrentKey, SessionDep
from api.webhooks import service

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class WebhookSecret(BaseModel):
    secret: str  # whsec_<base64 of the key bytes>, as Standard Webhooks verifiers take it


@router.get("/secret", response_model=WebhookSecret)
async def secret(key: CurrentKey, session: SessionDep) -> WebhookSecret:
    """The key that signs this tenant's webhooks (made on first use)."""
    return WebhookSecret(secret=await service.tenant_secret(session, key.tenant))
