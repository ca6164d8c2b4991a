"""Request and response bodies of /v1/jobs."""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from inferq.models import JobEnd

# A job's error, timings, feedback and evaluation have one shape, in the API's answers and in
# webhook bodies.
from inferq.webhooks import ErrorInfo, EvaluationInfo, FeedbackInfo, Timings

MAX_TOKENS_LIMIT = 131_072
MAX_COMMENT_CHARS = 2000
MAX_DEADLINE_SECONDS = 7 * 86400


# --- what Postgres can store ----------------------------------------------------------------
# Python's JSON parser (Starlette's) accepts NaN, Infinity and lone UTF-16 surrogates such as
# "\ud800", and JSON allows "\u0000"; Postgres stores none of them in text or JSONB. Refused
# here, a request fails alone with a 422 naming the field, instead of failing in the database
# (and taking down the submits written in the same batch).


def text_problem(text: str) -> str | None:
    """Why Postgres would refuse `text`, or None."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        return f"contains a lone surrogate (\\u{code:04x}), which is not valid Unicode"
    return None


def json_problem(value: Any, where: str) -> str | None:
    """Why Postgres would refuse the JSON `value` (nested), naming where; or None."""
    pending: list[tuple[str, Any]] = [(where, value)]  # a stack: deep nesting cannot recurse
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                return f"{path} {problem}"
        elif isinstance(item, float) and not math.isfinite(item):
            number = "NaN" if math.isnan(item) else ("Infinity" if item > 0 else "-Infinity")
            return f"{path} is {number}, which JSON cannot carry: send a finite number or null"
        elif isinstance(item, dict):
            for name, child in item.items():
                problem = text_problem(name)
                if problem is not None:
                    return f"a key of {path} {problem}"
                pending.append((f"{path}.{name}", child))
        elif isinstance(item, list):
            pending.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
    return None


def storable_text(value: str) -> str:
    """`value`, or a validation error saying why Postgres would refuse it."""
    problem = text_problem(value)
    if problem is not None:
        raise PydanticCustomError(
            "unstorable_text", "{problem}", {"problem": f"the text {problem}"}
        )
    return value


def _storable_json(value: dict[str, Any]) -> dict[str, Any]:
    problem = json_problem(value, "metadata")
    if problem is not None:
        raise PydanticCustomError("unstorable_json", "{problem}", {"problem": problem})
    return value


# Text and JSON a request may carry: what Postgres can store.
Text = Annotated[str, AfterValidator(storable_text)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_storable_json)]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: Text


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: HttpUrl
    events: list[JobEnd] = Field(default_factory=lambda: list(get_args(JobEnd)))


class Sampling(BaseModel):
    """Generation parameters shared by the jobs and the OpenAI-compatible routes."""

    # NaN and Infinity parse (Python's JSON reader takes them) but are no numbers to use.
    model_config = ConfigDict(allow_inf_nan=False)

    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: list[Text] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class JobCreate(Sampling):
    model_config = ConfigDict(extra="forbid")

    model: Text = Field(min_length=1, max_length=200)
    prompt: Text | None = Field(None, min_length=1)
    messages: list[Message] | None = Field(None, min_length=1)
    priority: Literal["interactive", "batch"] = "interactive"
    user: Text | None = Field(
        None, max_length=200, description="The caller's end user, for cost per user."
    )
    webhook: Webhook | None = None
    cache: bool = True
    metadata: JsonObject = Field(default_factory=dict)
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


class Links(BaseModel):
    self: str
    events: str
    cancel: str


class JobOut(BaseModel):
    id: uuid.UUID
    status: str
    model: str
    requested_model: str
    user: str | None = None
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
    # While queued: seconds until it starts, from its model's recent throughput (None: none).
    eta_seconds: float | None = None
    # Oldest chat messages left out to fit the model's context window.
    dropped_messages: int = 0
    metadata: dict[str, Any]
    # The caller key's rating, else the latest; null until someone rated the job.
    feedback: FeedbackInfo | None = None
    # The judge's verdict once it is in (docs/quality.md); null otherwise.
    evaluation: EvaluationInfo | None = None
    # When retention or input redaction cleared the job's texts: `output` is then null.
    redacted_at: datetime | None = None
    links: Links


class JobList(BaseModel):
    data: list[JobOut]
    next_cursor: str | None


class FeedbackCreate(BaseModel):
    """A rating of a job's answer; the latest from a key replaces its earlier one."""

    model_config = ConfigDict(extra="forbid")

    rating: Literal[1, -1] = Field(
        description="1: a good answer (thumbs up), -1: a bad one (thumbs down)"
    )
    comment: Text | None = Field(None, max_length=MAX_COMMENT_CHARS)

    @field_validator("rating", mode="before")
    @classmethod
    def _an_integer(cls, value: Any) -> Any:
        # `true` and `1.0` equal 1 in Python: no ratings all the same.
        if type(value) is not int:
            raise PydanticCustomError("rating", "the rating is the integer 1 or -1")
        return value


class FeedbackOut(BaseModel):
    job_id: uuid.UUID
    rating: int
    comment: str | None
    created_at: datetime
