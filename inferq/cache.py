"""The response cache and the models' recent throughput, both in Redis.

A deterministic request (temperature 0, a fixed seed, or on a `tgi` model no sampling
parameter at all: TGI's default is greedy, an OpenAI-compatible server samples by default)
is keyed by a hash of (tenant, resolved model, input, the parameters that shape the output).
The API computes the key at submit and carries it in the job's params; the worker stores a
succeeded job's answer under it, and the API answers the next identical request from it.

Throughput: the worker counts the jobs it starts per model in ten-second buckets; the API
reads the last minute of them to estimate a queued job's start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Any

import redis.exceptions
from pydantic import BaseModel, ConfigDict, ValidationError

from inferq.protocol import JobInput, JobParams
from inferq.registry import ModelSpec

# Only these parameters change what a backend generates; `cache` itself does not.
_OUTPUT_PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed")

log = logging.getLogger("inferq.cache")

REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
BUCKET_SECONDS = 10
WINDOW_BUCKETS = 6  # one minute


class CachedAnswer(BaseModel):
    """What a hit replays: a succeeded job's complete answer."""

    model_config = ConfigDict(frozen=True)

    output: str
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


def answer_key(key: str) -> str:
    return f"inferq:cache:{key}"


def deterministic(params: JobParams, backend: str) -> bool:
    if params.temperature == 0 or params.seed is not None:
        return True
    # TGI samples only when asked to; an OpenAI-compatible server samples by default.
    return backend == "tgi" and params.temperature is None and params.top_p is None


def cache_key(tenant: str, spec: ModelSpec, job_input: JobInput, params: JobParams) -> str:
    """The hash of everything that decides the answer, the tenant first: never shared. The
    model's queue carries the deployment's prefix: deployments sharing a Redis share nothing."""
    shaping = {name: getattr(params, name) for name in _OUTPUT_PARAMS}
    canonical = json.dumps(
        [tenant, spec.queue, spec.name, job_input.stored(), shaping],
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def key_for(tenant: str, spec: ModelSpec, values: dict[str, Any]) -> str | None:
    """The cache key of a job about to be created (its row `values`), None if not cacheable."""
    params = JobParams.model_validate(values["params"])
    if not params.cache or not deterministic(params, spec.backend):
        return None
    return cache_key(tenant, spec, JobInput.model_validate(values["input"]), params)


async def lookup(redis: Any, key: str) -> CachedAnswer | None:
    """The stored answer (redis.asyncio client), None on a miss or an unreadable entry.

    Redis being down is a miss: the cache only saves work, and the job can still be stored
    (the sweeper enqueues it once Redis is back).
    """
    try:
        raw = await redis.get(answer_key(key))
    except REDIS_DOWN:
        log.warning("response cache unavailable (Redis down); answering as a miss")
        return None
    if raw is None:
        return None
    try:
        return CachedAnswer.model_validate_json(raw)
    except ValidationError:
        return None


def store_in(pipe: Any, key: str, answer: CachedAnswer, ttl_seconds: int) -> None:
    """One SET with its TTL, added to a pipeline the worker sends."""
    pipe.set(answer_key(key), answer.model_dump_json(), ex=ttl_seconds)


# -- throughput -------------------------------------------------------------------------------


def _bucket_key(model: str, bucket: int) -> str:
    return f"inferq:started:{model}:{bucket}"


def count_start(redis: Any, model: str) -> None:
    """Count one job started on `model` (a sync client); one pipelined round trip."""
    with redis.pipeline(transaction=False) as pipe:
        count_start_in(pipe, model)
        pipe.execute()


def count_start_in(pipe: Any, model: str) -> None:
    """`count_start`'s commands, added to a pipeline the caller sends."""
    key = _bucket_key(model, int(time.time()) // BUCKET_SECONDS)
    pipe.incr(key)
    pipe.expire(key, BUCKET_SECONDS * (WINDOW_BUCKETS + 2))


async def starts_per_second(redis: Any, model: str) -> float:
    """Jobs started on `model` per second over the last minute (redis.asyncio client)."""
    now = time.time()
    current = int(now) // BUCKET_SECONDS
    buckets = range(current - WINDOW_BUCKETS + 1, current + 1)
    try:
        counts = await redis.mget([_bucket_key(model, b) for b in buckets])
    except REDIS_DOWN:
        return 0.0  # no estimate while Redis is down

    started = sum(int(c) for c in counts if c is not None)
    # The current bucket is partly elapsed: count the window that really passed.
    elapsed = (WINDOW_BUCKETS - 1) * BUCKET_SECONDS + (now - current * BUCKET_SECONDS)
    return started / max(elapsed, 1.0)


def eta_seconds(position: int, rate: float) -> float | None:
    """Seconds until a job with `position` jobs before it starts; None with no throughput."""
    if rate <= 0 or not math.isfinite(rate):
        return None
    return round((position + 1) / rate, 1)
