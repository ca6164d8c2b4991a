"""OpenAI-compatible completions run as inferq jobs: the same rows, queue and token stream.

A request becomes a job (create, commit, enqueue); the answer is then read from the job's
events: a non-streaming reply waits for `done` or `error` and reads the stored job, a
streaming reply turns token events into OpenAI chunks. A client that disconnects before
its answer is complete, streaming or not, cancels the job (as vLLM aborts the request),
which frees the backend's slot; the job ends `cancelled` with its partial output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import anyio
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.auth import Principal
from api.disconnect import DisconnectWatcher
from api.errors import ApiError, problems, redact_addresses
from api.events.service import JobEvents
from api.jobs.schemas import JobCreate, Message
from api.jobs.service import Created, cancel_job, submit_job
from api.limits import Gate
from api.openai.errors import JOB_HEADER, OpenAIError
from api.openai.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChunkChoice,
    CompletionRequest,
    ContentPart,
    Delta,
    ModelCard,
    ModelList,
    OpenAIRequest,
    TextChoice,
    TextCompletion,
    Usage,
)
from api.state import AppState
from inferq.events import TERMINAL_EVENTS, Event
from inferq.models import Job, JobStatus
from inferq.registry import Registry

log = logging.getLogger("inferq.openai")

# OpenAI's default for the legacy completions route (chat jobs use the platform's default).
COMPLETIONS_MAX_TOKENS = 16

# Parameters inferq does not implement, each with the values that ask for nothing (clients
# often send those by default). Any other value, or an unknown parameter, is a clear 400.
NEUTRAL: dict[str, tuple[object, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}

# Backend finish reasons (TGI's and OpenAI's) in OpenAI's words. A cancelled job ends with
# `stop`: OpenAI has no word for it, and its status is on the job.
FINISH_REASONS = {
    "eos_token": "stop",
    "stop_sequence": "stop",
    "stop": "stop",
    "length": "length",
    "cancelled": "stop",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
}

# The attempt number the `openai` SDK sends with every request (see `sdk_retry`).
SDK_RETRY_HEADER = "x-stainless-retry-count"
# How far back a retry looks for its call's job: the SDK's default timeout (600 s) for the
# first attempt, then its backoff.
SDK_RETRY_WINDOW_SECONDS = 900.0

# The HTTP status of a failed job, by its error type; other failures are the server's.
FAILURE_STATUS = {
    "validation": 400,
    "backend_rejected": 400,
    "overloaded": 503,
    "backend_unavailable": 502,
    "connection": 502,
    "timeout": 504,
    "deadline_exceeded": 504,
}


def _unsupported(param: str, message: str, code: str = "unsupported_parameter") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _is_neutral(value: object, neutral: tuple[object, ...]) -> bool:
    # Compare types too: `0 == False`, but `logprobs: 0` asks for log probabilities.
    return any(type(value) is type(n) and value == n for n in neutral)


def check_supported(body: OpenAIRequest) -> None:
    """Refuse, with a 400 naming it, any parameter inferq would otherwise silently ignore."""
    if body.n not in (None, 1):
        raise _unsupported("n", "n must be 1: inferq generates one choice per request")
    if body.stream_options is not None and not body.stream:
        raise _unsupported("stream_options", "stream_options is only allowed with stream: true")
    for name, value in (body.model_extra or {}).items():
        neutral = NEUTRAL.get(name)
        if neutral is None:
            raise _unsupported(name, f"unrecognized parameter {name!r}", "unknown_parameter")
        if not _is_neutral(value, neutral):
            raise _unsupported(name, f"{name!r} is not supported by inferq")


def _content(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise _unsupported(
                f"{where}.content", f"{where}.content[{j}]: only text parts are supported"
            )
    return "\n".join(part.text or "" for part in content)


def _message(i: int, message: ChatMessage) -> Message:
    where = f"messages[{i}]"
    if message.role in ("tool", "function"):
        raise _unsupported(f"{where}.role", f"{where}: tool messages need tools, unsupported")
    for name, value in (message.model_extra or {}).items():
        if value not in (None, [], ""):
            raise _unsupported(f"{where}.{name}", f"{where}.{name} is not supported by inferq")
    role = "system" if message.role == "developer" else message.role
    return Message(role=role, content=_content(message.content, where))


def _prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if prompt and not isinstance(prompt[0], str):
        raise _unsupported("prompt", "token-id prompts are not supported; send text")
    raise _unsupported("prompt", "give exactly one prompt per request")


def _job(body: OpenAIRequest, **inputs: Any) -> JobCreate:
    try:
        return JobCreate(
            model=body.model,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop,
            seed=body.seed,
            user=body.user,
            metadata=body.metadata or {},
            **inputs,
        )
    except ValidationError as exc:
        first = problems(exc.errors()[:1])[0]
        raise OpenAIError(400, first.message, param=first.param) from exc


def chat_job(body: ChatCompletionRequest) -> JobCreate:
    check_supported(body)
    messages = [_message(i, m) for i, m in enumerate(body.messages)]
    return _job(body, messages=messages, max_tokens=body.max_completion_tokens or body.max_tokens)


def completion_job(body: CompletionRequest) -> JobCreate:
    """The prompt as is; on an `openai` model the worker sends it as one user message."""
    check_supported(body)
    return _job(
        body, prompt=_prompt(body.prompt), max_tokens=body.max_tokens or COMPLETIONS_MAX_TOKENS
    )


def request_digest(body: OpenAIRequest, kind: Literal["chat", "text"]) -> str:
    """The hash of the request as sent: the same for every attempt of one SDK call."""
    sent = {"kind": kind, "body": body.model_dump(mode="json")}
    canonical = json.dumps(sent, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def sdk_retry(headers: Mapping[str, str]) -> bool:
    """Whether this request is the `openai` SDK retrying a call it already sent.

    The SDK numbers each attempt of a call in `x-stainless-retry-count` (0 for the first)
    and sends nothing else that stays the same across them: it makes an idempotency key
    per call, but the `OpenAI` client sends it in no header. So a retry is told apart by
    its number, and its earlier attempt found by what stays the same: the API key and the
    request body.
    """
    count = headers.get(SDK_RETRY_HEADER, "")
    return count.isdigit() and int(count) > 0


async def earlier_attempt(session: AsyncSession, key: Principal, digest: str) -> Job | None:
    """The job an earlier attempt of this call made: the key's newest with the same body.

    A job cancelled because its caller went away (a timeout, a dropped connection) is not
    reused: the retry is that caller coming back for an answer.
    """
    since_ms = int((time.time() - SDK_RETRY_WINDOW_SECONDS) * 1000)
    oldest = uuid.UUID(int=since_ms << 80)  # ids are UUIDv7: time-ordered, ms first
    job: Job | None = await session.scalar(
        select(Job)
        .where(
            Job.tenant == key.tenant,
            Job.id >= oldest,
            Job.api_key_id.is_not_distinct_from(key.key_id),
            Job.request_hash == digest,
            Job.status != JobStatus.cancelled,
        )
        .order_by(Job.id.desc())
        .limit(1)
    )
    return job


async def create(
    state: AppState,
    key: Principal,
    body: JobCreate,
    idempotency_key: str | None,
    digest: str,
    retried: bool = False,
    gate: Gate | None = None,
) -> Created:
    """The request's job: new, or the one made by the same Idempotency-Key or by an earlier
    attempt of the same SDK call (`retried`; see `sdk_retry`)."""
    if not state.registry.serves(body.model):
        offered = ", ".join(sorted(state.registry.offered()))
        message = f"unknown model {body.model!r}; available: {offered}"
        raise OpenAIError(404, message, param="model", code="model_not_found")
    if retried and idempotency_key is None:
        async with state.sessions() as session:  # closed: no connection held for the answer
            earlier = await earlier_attempt(session, key, digest)
        if earlier is not None:
            return Created(earlier, replayed=True)
    return await submit_job(state, key, body, idempotency_key, digest, gate)


def usage(input_tokens: int | None, output_tokens: int | None) -> Usage:
    prompt, completion = input_tokens or 0, output_tokens or 0
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def finish_reason(reason: str | None) -> str:
    return FINISH_REASONS.get(reason or "stop", "stop")


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to one request: its job, and the shape the client asked for."""

    job_id: uuid.UUID
    model: str
    created: int
    kind: Literal["chat", "text"]
    include_usage: bool = False

    @classmethod
    def of(cls, job: Job, kind: Literal["chat", "text"], body: OpenAIRequest) -> Reply:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return cls(job.id, job.model, int(job.created_at.timestamp()), kind, include_usage)

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{self.job_id}"

    @property
    def headers(self) -> dict[str, str]:
        return {JOB_HEADER: str(self.job_id)}

    def whole(self, text: str, reason: str, counts: Usage) -> BaseModel:
        if self.kind == "text":
            choice = TextChoice(text=text, finish_reason=reason)
            return TextCompletion(**self._ids(), choices=[choice], usage=counts)
        message = ChatChoice(message=AssistantMessage(content=text), finish_reason=reason)
        return ChatCompletion(**self._ids(), choices=[message], usage=counts)

    def chunk(self, text: str | None = None, reason: str | None = None) -> BaseModel:
        """One streamed piece of text, or the closing chunk with the finish reason."""
        if self.kind == "text":
            return TextCompletion(
                **self._ids(), choices=[TextChoice(text=text or "", finish_reason=reason)]
            )
        delta = Delta(content=text)
        return ChatCompletionChunk(
            **self._ids(), choices=[ChunkChoice(delta=delta, finish_reason=reason)]
        )

    def opening(self) -> list[BaseModel]:
        """OpenAI opens a chat stream with the role; a text stream starts with text."""
        if self.kind == "text":
            return []
        delta = Delta(role="assistant", content="")
        return [ChatCompletionChunk(**self._ids(), choices=[ChunkChoice(delta=delta)])]

    def usage_chunk(self, counts: Usage) -> BaseModel:
        """The extra last chunk `include_usage` asks for: no choices, the usage."""
        model = TextCompletion if self.kind == "text" else ChatCompletionChunk
        return model(**self._ids(), choices=[], usage=counts)

    def _ids(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model}


def job_error(job_id: uuid.UUID, error_type: str | None, message: str) -> OpenAIError:
    """A failed job as an OpenAI error; the SDK must not retry it.

    The platform has already retried the backend; a retry by the SDK would find this same
    job (see `sdk_retry`). Backend addresses are taken out of the message.
    """
    kind = error_type or "error"
    status = FAILURE_STATUS.get(kind, 500)
    return OpenAIError(
        status,
        redact_addresses(message) or f"the job failed ({kind})",
        code=kind,
        job_id=str(job_id),
        headers={"x-should-retry": "false"},
    )


def job_events(state: AppState, job_id: uuid.UUID) -> JobEvents:
    """The job's events from its start; one this process accepted a moment ago opens with
    its status as accepted, without reading its row."""
    fresh = state.fresh_jobs.get(job_id)
    return JobEvents(state.link, state.hub, state.sessions, job_id, None, fresh)


def follow(state: AppState, job_id: uuid.UUID) -> contextlib.aclosing[AsyncGenerator[Event, None]]:
    """The job's events from its start; closing them leaves the hub."""
    # JobEvents.__aiter__ is an async generator, which can be closed.
    events = aiter(job_events(state, job_id))
    return contextlib.aclosing(cast(AsyncGenerator[Event, None], events))


async def until_end(state: AppState, job_id: uuid.UUID) -> Event:
    """The job's closing event (`done` or `error`)."""
    async with follow(state, job_id) as events:
        async for event in events:
            if event.type in TERMINAL_EVENTS:
                return event
    raise OpenAIError(500, "the job's event stream ended without an end", code="stream_ended")


async def until_end_or_gone(request: Request, state: AppState, job_id: uuid.UUID) -> Event | None:
    """The job's closing event, or None if the client disconnected first."""
    async with DisconnectWatcher(request.receive) as client:
        return await until_end(state, job_id)
    assert client.gone
    return None


async def abandon(state: AppState, key: Principal, job_id: uuid.UUID) -> None:
    """Cancel the job of a client that went away; its answer has no reader left."""
    log.info("client disconnected, cancelling its job", extra={"job_id": str(job_id)})
    # Shielded: this runs while the response around it is being torn down.
    with anyio.move_on_after(state.settings.cancel_wait_seconds + 5, shield=True):
        async with state.sessions() as session:
            with contextlib.suppress(ApiError):  # it ended meanwhile
                await cancel_job(session, state, key, job_id)


async def complete(request: Request, state: AppState, key: Principal, reply: Reply) -> Response:
    """Wait for the job to end, then answer with the stored job's output and usage."""
    if await until_end_or_gone(request, state, reply.job_id) is None:
        await abandon(state, key, reply.job_id)
        return Response(status_code=499, headers=reply.headers)
    async with state.sessions() as session:
        job = await session.get(Job, reply.job_id)
    assert job is not None
    if job.status not in (JobStatus.succeeded, JobStatus.cancelled):
        raise job_error(job.id, job.error_type or job.status, job.error_message or "")
    counts = usage(job.input_tokens, job.output_tokens)
    body = reply.whole(job.output or "", finish_reason(job.finish_reason), counts)
    return JSONResponse(body.model_dump(mode="json"), headers=reply.headers)


def model_list(registry: Registry) -> ModelList:
    """The models, and `auto` when the models file routes it."""
    return ModelList(data=[ModelCard(id=name) for name in registry.offered()])


def model_card(registry: Registry, name: str) -> ModelCard:
    if not registry.serves(name):
        raise OpenAIError(404, f"no model {name!r}", param="model", code="model_not_found")
    return ModelCard(id=name)
