"""Webhooks: signing secrets, Standard Webhooks signatures, the URL guard, the body.

Both sides use this module: the API guards a URL at submit and hands out the tenant's secret;
the dispatcher in the beat process guards the URL again, signs and delivers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel
from sqlalchemy import Select, select
from sqlalchemy.dialects.postgresql import Insert, insert

from inferq.models import TERMINAL_STATUSES, Job, TenantSecret

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # Standard Webhooks asks for 24 to 64 bytes
JOB_ENDS = TERMINAL_STATUSES  # a webhook's default events: every end


# -- secrets and signatures ---------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, as Standard Webhooks define it."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    secret: str, message_id: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id, timestamp, body),
    }


def select_secret(tenant: str) -> Select[str]:
    return select(TenantSecret.secret).where(TenantSecret.tenant == tenant)


def insert_secret(tenant: str) -> Insert:
    """Make the tenant's secret on first use; a concurrent first use keeps the other's."""
    return (
        insert(TenantSecret)
        .values(tenant=tenant, secret=new_secret())
        .on_conflict_do_nothing(index_elements=["tenant"])
    )


# -- the URL guard ------------------------------------------------------------------------


class UnsafeUrl(ValueError):
    """A webhook URL that must not be called (non-global address, or a host that won't resolve)."""


def host_and_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if not parts.hostname:
        raise UnsafeUrl(f"the webhook URL {url!r} has no host")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _forbidden(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    return not ip.is_global


def check_addresses(host: str, addresses: Iterable[str]) -> list[str]:
    """The addresses if every one is global; a host with any private address is refused."""
    found = list(dict.fromkeys(addresses))
    bad = [a for a in found if _forbidden(a)]
    if bad:
        raise UnsafeUrl(
            f"the webhook host {host!r} resolves to {', '.join(bad)}, which is not a public "
            "address (private, loopback, link-local and other non-global addresses are refused)"
        )
    return found


def _addresses(infos: Iterable[tuple[Any, ...]]) -> list[str]:
    return [str(info[4][0]) for info in infos]


def resolve(host: str, port: int) -> list[str]:
    """The host's addresses (blocking: for threads, not for an event loop)."""
    try:
        return _addresses(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    except OSError as exc:
        raise UnsafeUrl(f"the webhook host {host!r} does not resolve: {exc}") from exc


async def resolve_async(host: str, port: int, seconds: float) -> list[str]:
    """The host's addresses, resolved off the event loop and within `seconds`."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(seconds):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError as exc:
        raise UnsafeUrl(f"the webhook host {host!r} did not resolve within {seconds:g}s") from exc
    except OSError as exc:
        raise UnsafeUrl(f"the webhook host {host!r} does not resolve: {exc}") from exc
    return _addresses(infos)


async def check_url(url: str, allow_private: bool, seconds: float) -> None:
    """Refuse a URL whose host resolves to a non-global address (at submit)."""
    if allow_private:
        return
    host, port = host_and_port(url)
    check_addresses(host, await resolve_async(host, port, seconds))


def delivery_addresses(url: str, allow_private: bool) -> list[str]:
    """The addresses to connect to (at delivery): resolved once, so that the address checked
    is the address called (a second lookup could answer differently: DNS rebinding)."""
    host, port = host_and_port(url)
    addresses = resolve(host, port)
    return addresses if allow_private else check_addresses(host, addresses)


# -- the body -----------------------------------------------------------------------------


class Usage(BaseModel):
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: float | None


class Timings(BaseModel):
    queue_ms: float | None
    ttft_ms: float | None
    duration_ms: float | None
    tokens_per_second: float | None


class ErrorInfo(BaseModel):
    type: str
    message: str


class FeedbackInfo(BaseModel):
    """A key's rating of a job's answer: 1 (up) or -1 (down), with an optional comment."""

    rating: int
    comment: str | None


class EvaluationInfo(BaseModel):
    """A judge's verdict on a job: a score 1-5 and why; `score` is null and `error` says why
    when the judge's reply could not be read or its job failed."""

    score: int | None
    rationale: str | None
    judge_model: str
    error: str | None = None


class JobPayload(BaseModel):
    """The body of a job's webhook: the fields of `GET /v1/jobs/{id}` that a finished job has,
    with the same names and shapes (id, status, model, requested_model, priority, the
    created/started/finished times, output, finish_reason, usage, timings, error, cached,
    attempts, metadata, feedback, evaluation, redacted_at); `queue_position` and `links` are
    left out. A webhook is sent as the job ends, before anyone rated or judged it: `feedback`
    and `evaluation` are then null."""

    id: uuid.UUID
    status: str
    model: str
    requested_model: str
    priority: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    output: str | None
    finish_reason: str | None
    usage: Usage
    timings: Timings
    error: ErrorInfo | None
    cached: bool
    attempts: int
    metadata: dict[str, Any]
    feedback: FeedbackInfo | None = None
    evaluation: EvaluationInfo | None = None
    # When retention or input redaction cleared the job's texts (null: never).
    redacted_at: datetime | None = None


def _ms(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier).total_seconds() * 1000, 3)


def job_timings(job: Job) -> Timings:
    tps = None
    if job.output_tokens and job.first_token_at and job.finished_at:
        seconds = (job.finished_at - job.first_token_at).total_seconds()
        tps = round(job.output_tokens / seconds, 3) if seconds > 0 else None
    return Timings(
        queue_ms=_ms(job.started_at, job.created_at),
        ttft_ms=_ms(job.first_token_at, job.created_at),
        duration_ms=_ms(job.finished_at, job.created_at),
        tokens_per_second=tps,
    )


def job_payload(
    job: Job, feedback: FeedbackInfo | None = None, evaluation: EvaluationInfo | None = None
) -> JobPayload:
    error = (
        ErrorInfo(type=job.error_type, message=job.error_message or "") if job.error_type else None
    )
    return JobPayload(
        id=job.id,
        status=job.status,
        model=job.model,
        requested_model=job.requested_model,
        priority=job.priority,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        output=job.output,
        finish_reason=job.finish_reason,
        usage=Usage(
            input_tokens=job.input_tokens,
            output_tokens=job.output_tokens,
            cost_usd=float(job.cost_usd) if job.cost_usd is not None else None,
        ),
        timings=job_timings(job),
        error=error,
        cached=job.cached,
        attempts=job.attempts,
        metadata=job.metadata_,
        feedback=feedback,
        evaluation=evaluation,
        redacted_at=job.redacted_at,
    )


def wanted(webhook: dict[str, Any] | None, status: str) -> bool:
    """Whether the job's webhook asked for this end (every end when it does not say)."""
    if not webhook:
        return False
    events = webhook.get("events")
    return status in (JOB_ENDS if events is None else events)
