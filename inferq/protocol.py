"""The typed data that crosses between the API and the workers besides job ids.

A job's input and parameters: the API stores them in `jobs.input` / `jobs.params` (JSONB) and
the worker reads them back. The payloads of a job's events: the worker, the
sweeper and the API write them to the job's Redis stream, readers parse them. Both sides use
these models, so that a field is spelled once.
"""

from __future__ import annotations

import enum
import math
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, field_validator

from inferq.models import JobStatus

# A rough count for text no tokenizer has seen: about four characters per token in English.
CHARS_PER_TOKEN = 4


def estimate_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: str
    content: str


class JobInput(BaseModel):
    """What to generate from: exactly one of a prompt or chat messages."""

    model_config = ConfigDict(frozen=True)

    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    def stored(self) -> dict[str, Any]:
        """The JSONB form: only the field the job has."""
        return self.model_dump(exclude_none=True)

    def chars(self) -> int:
        if self.messages is None:
            return len(self.prompt or "")
        return sum(len(m.content) for m in self.messages)

    def estimated_tokens(self) -> int:
        """For when no tokenizer counted the input."""
        return estimate_tokens(self.chars())


class JobParams(BaseModel):
    """Generation parameters, `max_tokens` already clamped to the model's cap."""

    model_config = ConfigDict(frozen=True)

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    cache: bool = True
    # The response cache's key (inferq.cache), set at submit for a cacheable request: the
    # worker stores the job's answer under it when the job succeeds.
    cache_key: str | None = None


# -- event payloads ---------------------------------------------------------------------------


class EventType(enum.StrEnum):
    status = "status"
    token = "token"
    reset = "reset"
    done = "done"
    error = "error"


class Payload(BaseModel):
    """The JSON `data` of one event type."""

    model_config = ConfigDict(frozen=True)

    EVENT: ClassVar[EventType]

    def dump(self) -> str:
        return self.model_dump_json()


P = TypeVar("P", bound=Payload)


class StatusData(Payload):
    EVENT = EventType.status

    status: JobStatus


class TokenData(Payload):
    EVENT = EventType.token

    text: str
    # How many tokens `text` holds (a flush carries several); absent, one. A finished job's
    # output rebuilt from its row carries none: only a running job's count is read from it.
    tokens: int | None = None

    def dump(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @property
    def count(self) -> int:
        return 1 if self.tokens is None else self.tokens


class ResetData(Payload):
    """The generation starts over (a new attempt, or a retried backend call)."""

    EVENT = EventType.reset

    attempt: int


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True)

    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None


class DoneData(Payload):
    EVENT = EventType.done

    status: JobStatus
    finish_reason: str | None = None
    usage: Usage = Usage()

    @field_validator("usage", mode="before")
    @classmethod
    def _no_usage(cls, value: Any) -> Any:
        return {} if value is None else value


class ErrorData(Payload):
    EVENT = EventType.error

    type: str
    message: str
