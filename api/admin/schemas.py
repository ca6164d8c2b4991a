"""Request and response bodies of /v1/admin."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.jobs.schemas import Text
from inferq.admin import KeyChanges, Limits
from inferq.judge import RESERVED_TENANT_PREFIX, is_reserved_tenant
from inferq.models import ApiKey

# A limit is a positive count (to stop a key altogether, revoke it); a budget may be 0.
Count = Field(None, ge=1, le=2**31 - 1)
Budget = Field(None, ge=0, max_digits=12, decimal_places=4)


class KeyLimits(BaseModel):
    """A key's limits (null: unlimited); docs/design.md says how each is enforced."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rate_limit_per_minute: int | None = Count
    tokens_per_minute: int | None = Count
    daily_budget_usd: Decimal | None = Budget
    max_queued: int | None = Count

    def limits(self) -> Limits:
        return Limits(
            self.rate_limit_per_minute,
            self.tokens_per_minute,
            self.daily_budget_usd,
            self.max_queued,
        )


class KeyCreate(KeyLimits):
    name: Text = Field(min_length=1, max_length=200)
    # Absent: the caller's own tenant.
    tenant: Text | None = Field(None, min_length=1, max_length=200)
    admin: bool = False

    @field_validator("tenant")
    @classmethod
    def _not_reserved(cls, tenant: str | None) -> str | None:
        # The platform's own jobs (the judge's) belong to such tenants: no key may see them.
        if tenant is not None and is_reserved_tenant(tenant):
            raise ValueError(f"tenant names starting with {RESERVED_TENANT_PREFIX!r} are reserved")
        return tenant


class KeyUpdate(KeyLimits):
    """Only the fields sent change; a limit sent as null is cleared."""

    name: Text | None = Field(None, min_length=1, max_length=200)

    @field_validator("name")
    @classmethod
    def _named(cls, value: str | None) -> str:
        if value is None:
            raise ValueError("a key's name cannot be null")
        return value

    def changes(self) -> KeyChanges:
        return KeyChanges(frozenset(self.model_fields_set), self.name, **asdict(self.limits()))


class KeyOut(BaseModel):
    """A key as an operator sees it: never its secret, nor the secret's digest."""

    id: uuid.UUID
    name: str
    prefix: str
    tenant: str
    admin: bool
    rate_limit_per_minute: int | None
    tokens_per_minute: int | None
    daily_budget_usd: float | None
    max_queued: int | None
    created_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: ApiKey) -> KeyOut:
        budget = row.daily_budget_usd
        return cls(
            id=row.id,
            name=row.name,
            prefix=row.prefix,
            tenant=row.tenant,
            admin=row.admin,
            rate_limit_per_minute=row.rate_limit_per_minute,
            tokens_per_minute=row.tokens_per_minute,
            daily_budget_usd=None if budget is None else float(budget),
            max_queued=row.max_queued,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
        )


class KeyCreated(KeyOut):
    secret: str = Field(description="The key itself: shown in this response only")


class KeyList(BaseModel):
    data: list[KeyOut]
    next_cursor: str | None
