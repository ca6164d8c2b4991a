"""The token stream protocol (DESIGN §5): Redis keys, event payloads, the publish script."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any


class EventType(enum.StrEnum):
    status = "status"
    token = "token"
    reset = "reset"
    done = "done"
    error = "error"


TERMINAL_EVENTS = frozenset({EventType.done, EventType.error})


def stream_key(job_id: str) -> str:
    return f"inferq:job:{job_id}:events"


def channel(job_id: str) -> str:
    return f"inferq:job:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"inferq:job:{job_id}:cancel"


# One round trip per flush: XADD each event, PUBLISH it with its stream id, optionally set
# the stream's TTL, and answer whether the job's cancel flag is set.
# KEYS: stream, channel, cancel flag. ARGV: maxlen, ttl (0 = none), then (type, data) pairs.
PUBLISH_SCRIPT = """
for i = 3, #ARGV, 2 do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                        'e', ARGV[i], 'd', ARGV[i + 1])
  redis.call('PUBLISH', KEYS[2], id .. '\\n' .. ARGV[i] .. '\\n' .. ARGV[i + 1])
end
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return redis.call('EXISTS', KEYS[3])
"""


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a job's stream; `id` is the Redis stream id ("ms-seq")."""

    type: EventType
    data: str  # JSON text
    id: str = ""
    # The event as sent to clients, rendered once by whoever fans it out to many.
    wire: bytes = field(default=b"", compare=False, repr=False)

    def payload(self) -> dict[str, Any]:
        return json.loads(self.data)

    @classmethod
    def make(cls, type_: EventType, **data: Any) -> Event:
        return cls(type_, json.dumps(data, separators=(",", ":")))

    @classmethod
    def from_message(cls, message: str) -> Event:
        """Parse a pub/sub message written by PUBLISH_SCRIPT."""
        id_, type_, data = message.split("\n", 2)
        return cls(EventType(type_), data, id_)

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str]) -> Event:
        """Parse an XRANGE entry."""
        return cls(EventType(fields["e"]), fields["d"], entry_id)


def script_args(events: list[Event], maxlen: int, ttl: int) -> list[str | int]:
    args: list[str | int] = [maxlen, ttl]
    for event in events:
        args += [event.type.value, event.data]
    return args


def script_keys(job_id: str) -> list[str]:
    return [stream_key(job_id), channel(job_id), cancel_key(job_id)]


def parse_stream_id(stream_id: str) -> tuple[int, int]:
    """'1700000000000-3' → (1700000000000, 3); anything unparsable sorts first."""
    ms, _, seq = stream_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (0, 0)


def usage(
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    cost_usd: float | None = None,
) -> dict[str, Any]:
    """The `usage` object of a `done` event."""
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "cost_usd": cost_usd}


def terminal_events(
    status: str,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
) -> list[Event]:
    """The closing events of a job: its status, then `error` for a failure, else `done`."""
    events = [Event.make(EventType.status, status=status)]
    if error is not None:
        events.append(Event.make(EventType.error, type=error[0], message=error[1]))
    else:
        events.append(
            Event.make(EventType.done, status=status, finish_reason=finish_reason, usage=usage)
        )
    return events
