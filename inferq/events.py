"""The token stream protocol: Redis keys, the event envelope, the publish script.

The payloads themselves are the models of `inferq.protocol`.
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inferq.protocol import EventType as EventType  # the envelope's type, re-exported
from inferq.protocol import P, Payload, TokenData
from inferq.settings import Settings

TERMINAL_EVENTS = frozenset({EventType.done, EventType.error})


def stream_key(job_id: str) -> str:
    return f"inferq:job:{job_id}:events"


def channel(job_id: str) -> str:
    return f"inferq:job:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"inferq:job:{job_id}:cancel"


def claim_key(job_id: str) -> str:
    """The claim allowed to write the job's stream (see PUBLISH_SCRIPT)."""
    return f"inferq:job:{job_id}:claim"


# PUBLISH_SCRIPT's answer to a write it refused: the writer's claim is not the job's anymore.
REFUSED = -1
# Its answer to a writer that wrote before and finds its claim gone from Redis: Redis lost
# the stream since (restarted empty, failed over to a replica that was behind). Nothing was
# written; the writer writes again, showing readers the whole text after a `reset`.
LOST = -2
# How long a claim key outlives its first write: longer than any attempt runs.
CLAIM_TTL_SECONDS = 24 * 3600

# One round trip per flush: check the writer's claim, XADD each event, PUBLISH it with its
# stream id, optionally set the stream's TTL, and answer whether the job's cancel flag is set.
# KEYS: stream, channel, cancel flag, claim.
# ARGV: maxlen, ttl (0 = none), claim ("attempt:token", or "" = unfenced), claim TTL,
# continuing ("1": the writer wrote under this claim before, and this write does not start
# the text over), then (type, data) pairs.
#
# Fencing: a worker's writes carry its claim, and the claim key holds the newest claim that
# wrote. A write whose attempt is older than that one's is refused (REFUSED, nothing written),
# so a worker that lost its lease and still runs can write nothing after its successor's
# `reset`. A newer attempt takes the key over with its first write (the one right after its
# claim), so the key needs no write of its own. Unfenced writes are the API's and the
# sweeper's terminal events, written once the job's row has ended: they close the key.
#
# Loss: a continuing writer must find its own claim in the key. Missing (or an older one),
# Redis lost what the writer wrote before, and readers who resume after an event that is
# gone would miss tokens without a word; the script answers LOST and writes nothing. The
# writer's connection may not have failed at all (an idle pooled connection reconnects
# without an error), so only Redis itself can tell.
PUBLISH_SCRIPT = """
local claim = ARGV[3]
if claim == '' then
  redis.call('SET', KEYS[4], 'closed', 'EX', ARGV[4])
else
  local held = redis.call('GET', KEYS[4])
  if held ~= claim then
    if held then
      local held_attempt = tonumber(string.match(held, '^(%d+):'))
      local attempt = tonumber(string.match(claim, '^(%d+):'))
      if held_attempt == nil or held_attempt >= attempt then return -1 end
    end
    if ARGV[5] == '1' then return -2 end
    redis.call('SET', KEYS[4], claim, 'EX', ARGV[4])
  end
end
for i = 6, #ARGV, 2 do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                        'e', ARGV[i], 'd', ARGV[i + 1])
  redis.call('PUBLISH', KEYS[2], id .. '\\n' .. ARGV[i] .. '\\n' .. ARGV[i + 1])
end
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return redis.call('EXISTS', KEYS[3])
"""

# Its SHA1, as EVALSHA names it.
PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a job's stream; `id` is the Redis stream id ("ms-seq").

    `data` is the payload's JSON text: whoever only forwards an event (the API's fan-out)
    never parses it; whoever reads it parses it into its model with `parse`.
    """

    type: EventType
    data: str  # JSON text
    id: str = ""
    # The event as sent to clients, rendered once by whoever fans it out to many.
    wire: bytes = field(default=b"", compare=False, repr=False)

    @classmethod
    def of(cls, payload: Payload) -> Event:
        return cls(payload.EVENT, payload.dump())

    def parse(self, kind: builtins.type[P]) -> P:
        """The payload as `kind`, which must be this event's type."""
        if kind.EVENT is not self.type:
            raise ValueError(f"a {self.type.value} event is not {kind.__name__}")
        return kind.model_validate_json(self.data)

    @classmethod
    def from_message(cls, message: str) -> Event:
        """Parse a pub/sub message written by PUBLISH_SCRIPT."""
        id_, type_, data = message.split("\n", 2)
        return cls(EventType(type_), data, id_)

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str]) -> Event:
        """Parse an XRANGE entry."""
        return cls(EventType(fields["e"]), fields["d"], entry_id)


def from_entries(entries: Any) -> list[Event]:
    """The events of an XRANGE reply (a client that decodes responses)."""
    return [Event.from_entry(str(entry_id), fields) for entry_id, fields in entries or []]


def from_reply(entries: list[list[Any]] | None) -> list[Event]:
    """The events of an XRANGE (or XREVRANGE) reply as RESP has it, [id, [field, value, …]]
    (inferq.resp's replies)."""
    events = []
    for entry_id, pairs in entries or ():
        fields = dict(zip(pairs[::2], pairs[1::2], strict=True))
        events.append(Event.from_entry(entry_id, fields))
    return events


def script_args(
    events: list[Event], maxlen: int, ttl: int, claim: str = "", continuing: bool = False
) -> list[str | int]:
    """PUBLISH_SCRIPT's ARGV. `claim` is the writer's `fence(...)`; empty, the write is
    unfenced, which only the terminal events of a job whose row has ended may be.
    `continuing`: the writer wrote under `claim` before and does not start the text over
    here, so that its claim missing from Redis means the stream was lost (LOST)."""
    args: list[str | int] = [maxlen, ttl, claim, CLAIM_TTL_SECONDS, int(continuing)]
    for event in events:
        args += [event.type.value, event.data]
    return args


def fence(attempt: int, token: str) -> str:
    """A claim as PUBLISH_SCRIPT compares it: attempts only grow, so the newer claim wins."""
    return f"{attempt}:{token}"


def script_keys(job_id: str) -> list[str]:
    return [stream_key(job_id), channel(job_id), cancel_key(job_id), claim_key(job_id)]


def parse_stream_id(stream_id: str) -> tuple[int, int]:
    """'1700000000000-3' → (1700000000000, 3); anything unparsable sorts first."""
    ms, _, seq = stream_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (0, 0)


# A redis-py `Script` (sync or asyncio) registered from PUBLISH_SCRIPT.
PublishScript = Callable[..., Any]


def publish_end(
    script: PublishScript, job_id: str, events: list[Event], settings: Settings, client: Any = None
) -> Any:
    """Write a job whose row has ended its closing events, unfenced, and give its stream the
    TTL; `events` may be empty (only the TTL). An awaitable on an asyncio script."""
    args = script_args(events, settings.stream_maxlen, settings.stream_ttl_seconds)
    return script(keys=script_keys(job_id), args=args, client=client)


# One vocabulary of `finish_reason` for every job, whichever backend and route ran it:
# `stop` (the model ended, or a stop sequence matched), `length` (max_tokens reached),
# `cancelled`. Backends' own words are mapped; an unknown one passes through as it is.
FINISH_REASONS = {
    "eos_token": "stop",
    "stop_sequence": "stop",
    "stop": "stop",
    "length": "length",
    "max_tokens": "length",
}


def finish_reason_of(backend_reason: str) -> str:
    return FINISH_REASONS.get(backend_reason, backend_reason)


@dataclass(frozen=True, slots=True)
class Progress:
    """A running job's output so far, as its event stream holds it."""

    text: str
    tokens: int


def progress(events: list[Event]) -> Progress:
    """The tokens after the last `reset`: their text and how many tokens they carry."""
    parts: list[str] = []
    tokens = 0
    for event in events:
        if event.type is EventType.reset:
            parts, tokens = [], 0
        elif event.type is EventType.token:
            token = event.parse(TokenData)
            parts.append(token.text)
            tokens += token.count
    return Progress("".join(parts), tokens)
