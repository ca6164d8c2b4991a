"""Request and response bodies of /v1/jobs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

# A job's timings have one definition, shared with the webhook body.
from inferq.webhooks import Timings

MAX_TOKENS_LIMIT = 131_072
MAX_DEADLINE_SECONDS = 7 * 86400
JobEnd = Literal["succeeded", "failed", "cancelled", "expired"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: HttpUrl
    events: list[JobEnd] = Field(default_factory=lambda: list(get_args(JobEnd)))


class Sampling(BaseModel):
    """Generation parameters shared by the jobs and the OpenAI-compatible routes."""

    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: list[str] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class JobCreate(Sampling):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    prompt: str | None = Field(None, min_length=1)
    messages: list[Message] | None = Field(None, min_length=1)
    priority: Literal["interactive", "batch"] = "interactive"
    webhook: Webhook | None = None
    cache: bool = True
    metadata: dict[str, Any] = Field(default_factory=dict)
    deadline_seconds: float | None = Field(
        None,
        gt=0,
        le=MAX_DEADLINE_SECONDS,
        description="A job not started this many seconds after it was created ends `expired`.",
    )

    @model_validator(mode="after")
    def _exactly_one_input(self) -> JobCreate:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class Usage(BaseModel):
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: float | None


class ErrorInfo(BaseModel):
    type: str
    message: str


class Links(BaseModel):
    self: str
    events: str
    cancel: str


class JobOut(BaseModel):
    id: uuid.UUID
    status: str
    model: str
    requested_model: str
    priority: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deadline_at: datetime | None = None
    output: str | None
    finish_reason: str | None
    usage: Usage
    timings: Timings
    error: ErrorInfo | None
    cached: bool
    attempts: int
    queue_position: int | None
    metadata: dict[str, Any]
    links: Links


class JobList(BaseModel):
    data: list[JobOut]
    next_cursor: str | None
