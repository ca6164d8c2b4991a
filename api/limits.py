"""Per-key limits at submit: admit or refuse with a 429, report the counters.

A key with no limit costs nothing here. A key with limits costs one Redis script
(inferq.limits), whichever limits it has: `max_queued` too is a counter there, lowered when a
job leaves `queued`. Concurrent submits share the round trip (api.admission).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.admission import Admissions
from api.auth import Principal
from api.deps import CurrentKey, StateDep
from api.errors import ApiError
from inferq.limits import (
    KeyLimits,
    Verdict,
    admit_args,
    counters_prefix,
    estimate_tokens,
    reservation_key,
    settle_async,
    to_nano,
)
from inferq.metrics import LIMITS_HIT
from inferq.registry import ModelSpec
from inferq.settings import Settings

# Where the middleware leaves the headers' dict in the request's scope state.
HEADERS_STATE = "inferq.ratelimit_headers"


class RateLimited(ApiError):
    status = 429
    type = "rate_limited"


class BudgetExceeded(ApiError):
    status = 429
    type = "budget_exceeded"


class QueueFull(ApiError):
    status = 429
    type = "queue_full"


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def duration(seconds: float) -> str:
    """OpenAI's way of writing a reset time: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text_ = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text_}" if minutes else text_


def rate_headers(limits: KeyLimits, seen: Verdict) -> dict[str, str]:
    """The x-ratelimit-* headers of the limits the key has (requests, tokens, or both)."""
    headers = {}
    reset = duration(seen.reset)
    if limits.requests_per_minute is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
        left = max(0, limits.requests_per_minute - seen.requests)
        headers["x-ratelimit-remaining-requests"] = str(left)
        headers["x-ratelimit-reset-requests"] = reset
    if limits.tokens_per_minute is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tokens_per_minute)
        headers["x-ratelimit-remaining-tokens"] = str(
            max(0, limits.tokens_per_minute - seen.tokens)
        )
        headers["x-ratelimit-reset-tokens"] = reset
    return headers


def refusal(
    limits: KeyLimits, seen: Verdict, window: int, tokens: int, settings: Settings
) -> ApiError:
    if seen.refused == "queue":
        return QueueFull(
            f"this key has {seen.queued} jobs queued, its limit is {limits.max_queued}",
            retry_after(settings.limit_queue_full_retry_seconds),
        )
    headers = retry_after(seen.retry_after)
    if seen.refused == "requests":
        return RateLimited(
            f"this key may send {limits.requests_per_minute} requests per {window} s;"
            f" retry in {headers['Retry-After']} s",
            headers,
        )
    if seen.refused == "tokens":
        tpm = limits.tokens_per_minute
        if tpm is not None and tokens > tpm:
            return RateLimited(
                f"this request reserves {tokens} tokens (input estimate + max_tokens), more than"
                f" the key's {tpm} tokens per {window} s: lower max_tokens or the input",
                headers,
            )
        return RateLimited(
            f"this key may use {tpm} tokens per {window} s and this request reserves {tokens}"
            f" (input estimate + max_tokens); retry in {headers['Retry-After']} s",
            headers,
        )
    return BudgetExceeded(
        f"this key's daily budget of {limits.daily_budget_usd} USD is spent, or held by its"
        " queued and running jobs; it renews at midnight UTC",
        headers,
    )


def input_chars(job_input: dict[str, Any]) -> int:
    prompt = job_input.get("prompt")
    if prompt is not None:
        return len(prompt)
    return sum(len(m.get("content") or "") for m in job_input.get("messages", []))


@dataclass
class Gate:
    """One submit's pass through its key's limits."""

    redis: aioredis.Redis
    admissions: Admissions
    settings: Settings
    key: Principal
    headers: dict[str, str] = field(default_factory=dict)  # sent with the answer

    async def admit(self, spec: ModelSpec, values: dict[str, Any]) -> bool:
        """Take the job's share of the key's limits, or raise the 429 of the first one it
        would pass; whether anything was reserved (under the job's id). `values` is the
        job's row, its max_tokens already capped."""
        limits = self.key.limits
        if limits is None or self.key.key_id is None:
            return False
        tokens = (estimate_tokens(input_chars(values["input"])), values["params"]["max_tokens"])
        cost = to_nano(spec.cost_usd(*tokens))
        prefix, window = counters_prefix(str(self.key.key_id)), self.settings.limit_window_seconds
        args = admit_args(prefix, window, limits, tokens, cost)
        answer = await self.admissions.admit(reservation_key(str(values["id"])), args)
        seen = Verdict.of(answer)
        self.headers.update(rate_headers(limits, seen))
        if seen.refused is not None:
            LIMITS_HIT.labels(seen.refused).inc()
            raise refusal(limits, seen, window, sum(tokens), self.settings)
        return True

    async def release(self, job_id: object) -> None:
        """Give back all a submit reserved when it made no job."""
        await settle_async(self.redis, str(job_id))


async def submit_gate(request: Request, key: CurrentKey, state: StateDep) -> Gate:
    gate = Gate(state.redis, state.admissions, state.settings, key)
    # The middleware's dict, so that every answer carries the headers, errors included.
    gate.headers = request.scope.get("state", {}).get(HEADERS_STATE, gate.headers)
    return gate


SubmitGate = Annotated[Gate, Depends(submit_gate)]


class RateLimitHeaders:
    """Adds the x-ratelimit-* headers a submit's gate found to its answer, whatever it is
    (an accepted job, a 429, a stream)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        scope.setdefault("state", {})[HEADERS_STATE] = headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and headers:
                extra = [(k.encode(), v.encode()) for k, v in headers.items()]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
