"""Per-key limits: counters in Redis, shared by every API replica.

Requests and tokens per minute count in fixed windows aligned on multiples of the window
length in Redis's clock (one clock for every replica). A fixed window costs one counter per
key and limit, resets at a known instant, so that `Retry-After` and `x-ratelimit-reset-*`
are exact (a client that waits that long is admitted), and lets a job give back the tokens
it did not use to the very window it took them from. Its price: across a window's edge a
key can send up to twice its limit within a short time; a sliding log would not, but it
costs a sorted-set entry per request and cannot hold token reservations.

The daily budget counts each key's spend per UTC day, in nano-USD integers (exact sums),
plus the cost held by its jobs still queued or running. Counters are keyed by day and by
window: whatever a job never settles (its end took a path that settles nothing) lapses
with its window, or at midnight UTC, instead of holding the key's limit forever.

A key's queued jobs (`max_queued`) are a counter too, raised by the admission script and
lowered once when the job leaves `queued` (its first claim, a cancel, its deadline): the
job's reservation records whether it counted, and the lowering deletes that mark, so it
happens once whichever path gets there first. If Redis loses the counters they restart at
0 and the marks are gone with them: the key may queue up to `max_queued` more than it has
until its queued jobs drain, a permissive error, never a stuck key. The counter also lapses
two days after the key's last submit, and never goes below 0. A worker settles only the jobs
of keys that have limits when it claims them: jobs of a key whose limits were all removed
meanwhile leave their reservations to lapse, and their queued count with them.

One script admits a submit (one round trip) and keeps what it reserved under the job's id;
one settles the job's end from that record, once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import redis
import redis.asyncio as aioredis

log = logging.getLogger("inferq.limits")

NANO = 1_000_000_000  # nano-USD per USD
DAY_SECONDS = 86_400
NO_LIMIT = -1  # what the scripts read as "no such limit on this key"
CHARS_PER_TOKEN = 4  # the input estimate: about four characters per token in English text

# KEYS: the job's reservation. ARGV: prefix, window, rpm, tpm, budget (nano), input
# estimate, output allowance, cost (nano), max queued; a limit of -1 is none. Admitted, the
# reservation is kept under the job's id until the job settles (or lapses with the day's
# counters). Returns: refused ('' | 'requests' | 'tokens' | 'budget' | 'queue'), retry after
# (s), requests in the window, tokens in the window, seconds to the window's end, the key's
# queued jobs (this one included when admitted).
ADMIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local prefix, window = ARGV[1], tonumber(ARGV[2])
local rpm, tpm, budget = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local input, output, cost = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local most = tonumber(ARGV[9])
local win = math.floor(now / window)
local reset = (win + 1) * window - now
local day = math.floor(now / 86400)
local rkey = prefix .. ':req:' .. window .. ':' .. win
local tkey = prefix .. ':tok:' .. window .. ':' .. win
local hkey = prefix .. ':held:' .. day
local qkey = prefix .. ':queued'
local requests = tonumber(redis.call('GET', rkey) or '0')
local used = tonumber(redis.call('GET', tkey) or '0')
local queued = 0
if most >= 0 then
  queued = tonumber(redis.call('GET', qkey) or '0')
end
local refused, retry = '', 0
if most >= 0 and queued >= most then
  refused, retry = 'queue', 0
elseif rpm >= 0 and requests + 1 > rpm then
  refused, retry = 'requests', reset
elseif tpm >= 0 and used + input + output > tpm then
  refused, retry = 'tokens', reset
elseif budget >= 0 then
  local spent = tonumber(redis.call('GET', prefix .. ':spent:' .. day) or '0')
  if spent + tonumber(redis.call('GET', hkey) or '0') >= budget then
    refused, retry = 'budget', (day + 1) * 86400 - now
  end
end
if refused ~= '' then
  return {refused, tostring(retry), requests, used, tostring(reset), queued}
end
local counted = 0
if most >= 0 then
  queued = redis.call('INCR', qkey)
  redis.call('EXPIRE', qkey, 2 * 86400)
  counted = 1
end
if rpm >= 0 then
  requests = redis.call('INCR', rkey)
  redis.call('EXPIRE', rkey, 2 * window)
end
if tpm < 0 then
  input, output = 0, 0
else
  used = redis.call('INCRBY', tkey, input + output)
  redis.call('EXPIRE', tkey, 2 * window)
end
if budget < 0 then
  cost = 0
else
  redis.call('INCRBY', hkey, cost)
  redis.call('EXPIRE', hkey, 2 * 86400)
end
redis.call('HSET', KEYS[1], 'prefix', prefix, 'window', window, 'win', win, 'input', input,
  'output', output, 'day', day, 'held', cost, 'queued', counted)
redis.call('EXPIRE', KEYS[1], 2 * 86400)
return {refused, tostring(retry), requests, used, tostring(reset), queued}
"""

# The job leaves `queued`: its key's queued count drops by one if its submit counted it,
# once (the mark is deleted). Part of both scripts below; h is the reservation's hash.
_LEAVE_QUEUE = """
local function leave_queue(h)
  if h.queued == '1' and redis.call('HDEL', KEYS[1], 'queued') == 1 then
    local qkey = h.prefix .. ':queued'
    if tonumber(redis.call('GET', qkey) or '0') > 0 then
      redis.call('DECR', qkey)
    end
  end
end
"""

# KEYS: the job's reservation. The job left `queued` (its worker's first claim).
DEQUEUE_SCRIPT = (
    _LEAVE_QUEUE
    + """
local prefix, queued = unpack(redis.call('HMGET', KEYS[1], 'prefix', 'queued'))
if queued then
  leave_queue({prefix = prefix, queued = queued})
end
return 0
"""
)

# KEYS: the job's reservation. ARGV: input tokens (-1: unknown, the estimate counts), output
# tokens, the job's cost (nano). Settles once: the reservation is deleted. The token change
# goes to the window the tokens were taken in, if it is still open (a closed window's count
# no longer matters); the held cost leaves the day it was held on; the spend counts on the
# day the job ends; a job still counted as queued (cancelled or expired while queued) leaves
# the count.
SETTLE_SCRIPT = (
    _LEAVE_QUEUE
    + """
local r = redis.call('HGETALL', KEYS[1])
if #r == 0 then
  return 0
end
local h = {}
for i = 1, #r, 2 do
  h[r[i]] = r[i + 1]
end
leave_queue(h)
redis.call('DEL', KEYS[1])
local reserved_input, reserved_output = tonumber(h.input), tonumber(h.output)
local input, output = tonumber(ARGV[1]), tonumber(ARGV[2])
if input < 0 then
  input = reserved_input
end
local tkey = h.prefix .. ':tok:' .. h.window .. ':' .. h.win
local change = input + output - reserved_input - reserved_output
if reserved_input + reserved_output > 0 and change ~= 0 and redis.call('EXISTS', tkey) == 1 then
  redis.call('INCRBY', tkey, change)
end
local hkey = h.prefix .. ':held:' .. h.day
if tonumber(h.held) > 0 and redis.call('EXISTS', hkey) == 1 then
  redis.call('DECRBY', hkey, h.held)
end
local spent = tonumber(ARGV[3])
if spent > 0 and tonumber(h.held) > 0 then
  local t = redis.call('TIME')
  local skey = h.prefix .. ':spent:' .. math.floor(tonumber(t[1]) / 86400)
  redis.call('INCRBY', skey, spent)
  redis.call('EXPIRE', skey, 2 * 86400)
end
return 1
"""
)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's limits; None: unlimited in that respect."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    daily_budget_usd: Decimal | None = None
    max_queued: int | None = None

    @classmethod
    def of(
        cls,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        daily_budget_usd: Decimal | None,
        max_queued: int | None,
    ) -> KeyLimits | None:
        """The limits, or None for a key with none (it costs nothing at submit)."""
        limits = cls(requests_per_minute, tokens_per_minute, daily_budget_usd, max_queued)
        return None if limits == cls() else limits


@dataclass(frozen=True, slots=True)
class Verdict:
    """The admission script's answer, with what the rate-limit headers report."""

    refused: str | None  # "requests", "tokens", "budget", "queue", or None: admitted
    retry_after: float  # seconds until the refusing limit resets (0 for "queue": unknown)
    requests: int  # in the current window, this request included when admitted
    tokens: int  # likewise
    reset: float  # seconds to the current window's end
    queued: int = 0  # the key's queued jobs, this one included when admitted

    @classmethod
    def of(cls, answer: list[Any]) -> Verdict:
        refused, retry, requests, used, reset, queued = (
            v.decode() if isinstance(v, bytes) else v for v in answer
        )
        return cls(
            refused or None, float(retry), int(requests), int(used), float(reset), int(queued)
        )


def counters_prefix(key_id: str) -> str:
    # One hash tag per key: every counter of a key sits in one slot of a Redis cluster.
    return f"inferq:limits:{{{key_id}}}"


def reservation_key(job_id: str) -> str:
    return f"inferq:limits:job:{job_id}"


def estimate_tokens(chars: int) -> int:
    """An estimate of the input's tokens from its length (the backend counts them later)."""
    return math.ceil(chars / CHARS_PER_TOKEN)


def to_nano(usd: float | Decimal) -> int:
    """USD as nano-USD, rounded up: a reservation never holds less than its cost."""
    return math.ceil(Decimal(str(usd)) * NANO)


def _limit(value: int | Decimal | None, scale: int = 1) -> int:
    return NO_LIMIT if value is None else math.floor(Decimal(value) * scale)


def admit_args(
    prefix: str, window: int, limits: KeyLimits, tokens: tuple[int, int], cost_nano: int
) -> list[Any]:
    """The admission script's arguments; `tokens` is (input estimate, output allowance)."""
    return [
        prefix,
        window,
        _limit(limits.requests_per_minute),
        _limit(limits.tokens_per_minute),
        _limit(limits.daily_budget_usd, NANO),
        *tokens,
        cost_nano,
        _limit(limits.max_queued),
    ]


def settle_args(
    input_tokens: int | None, output_tokens: int | None, cost_usd: float | Decimal | None
) -> list[Any]:
    # Unknown input tokens (a job cancelled before the backend said) count as the estimate.
    unknown = -1
    return [
        unknown if input_tokens is None else input_tokens,
        output_tokens or 0,
        to_nano(cost_usd or 0),
    ]


def settle_in(
    pipe: Any,
    job_id: str,
    input_tokens: int | None,
    output_tokens: int | None,
    cost_usd: float | Decimal | None,
) -> None:
    """At a job's end (the worker), added to a pipeline it sends: give back the tokens and
    cost its submit reserved and it did not use, and add its cost, whatever the end, to its
    key's spend today. A job of a key without limits reserved nothing: one read finds no
    reservation. Settles once. EVAL, not EVALSHA: a pipeline's answers are not read, and the
    script must run also on a Redis that lost its scripts."""
    pipe.eval(
        SETTLE_SCRIPT,
        1,
        reservation_key(job_id),
        *settle_args(input_tokens, output_tokens, cost_usd),
    )


def settle_unused(client: redis.Redis, job_ids: list[str]) -> None:
    """Settle jobs that ended using nothing (expired, or lost on every attempt: what their
    backend produced is unknown), in one round trip; the jobs of keys without limits find
    no reservation."""
    if not job_ids:
        return
    script = client.register_script(SETTLE_SCRIPT)
    try:
        with client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                script(keys=[reservation_key(job_id)], args=settle_args(0, 0, 0), client=pipe)
            pipe.execute()
    except redis.RedisError:
        log.warning("could not settle ended jobs' limits reservations", exc_info=True)


def dequeue_in(pipe: Any, job_id: str) -> None:
    """The job left `queued` (its first claim): its key's queued count drops, once; added to
    a pipeline the worker sends (EVAL, as `settle_in`). Should it be lost, the job's settle
    lowers the count instead."""
    pipe.eval(DEQUEUE_SCRIPT, 1, reservation_key(job_id))


async def settle_async(client: aioredis.Redis, job_id: str) -> None:
    """Give back all a job reserved (the API: its submit made no job, or it was cancelled
    while queued, so it used nothing)."""
    script = client.register_script(SETTLE_SCRIPT)
    await script(keys=[reservation_key(job_id)], args=settle_args(0, 0, 0))
