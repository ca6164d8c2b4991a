"""/v1/chat/completions, /v1/completions and /v1/models, as the OpenAI API has them."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel

from api.auth import Principal
from api.deps import CurrentKey, StateDep
from api.jobs.schemas import JobCreate
from api.limits import Gate, SubmitGate
from api.openai import service, streaming
from api.openai.errors import OpenAIRoute
from api.openai.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ModelCard,
    ModelList,
    OpenAIRequest,
    TextCompletion,
)
from api.openapi import SSE_EVENT, Responses, error_responses
from api.state import AppState

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    route_class=OpenAIRoute,
    responses=error_responses(400, 401, 404, 429, 500, 503, model=ErrorBody),
)

# A finished job's failure is answered with a status of its own (service.FAILURE_STATUS).
COMPLETION_ERRORS = error_responses(413, 502, 504, model=ErrorBody)


def _completion(model: type[BaseModel]) -> Responses:
    """A whole completion as JSON, or with `stream: true` its chunks as server-sent events."""
    stream = {"text/event-stream": {"schema": SSE_EVENT}}
    return {200: {"model": model, "content": stream}, **COMPLETION_ERRORS}


IdempotencyKey = Annotated[str | None, Header(max_length=255)]


@router.post("/chat/completions", response_model=None, responses=_completion(ChatCompletion))
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    key: CurrentKey,
    state: StateDep,
    gate: SubmitGate,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """A chat completion run as a job; `X-Inferq-Job-Id` names the job."""
    job = service.chat_job(body)
    return await _answer(request, key, state, gate, idempotency_key, job, body, "chat")


@router.post("/completions", response_model=None, responses=_completion(TextCompletion))
async def completions(
    body: CompletionRequest,
    request: Request,
    key: CurrentKey,
    state: StateDep,
    gate: SubmitGate,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """A text completion run as a job; `X-Inferq-Job-Id` names the job."""
    job = service.completion_job(body)
    return await _answer(request, key, state, gate, idempotency_key, job, body, "text")


async def _answer(
    request: Request,
    key: Principal,
    state: AppState,
    gate: Gate,
    idempotency_key: str | None,
    job: JobCreate,
    body: OpenAIRequest,
    kind: Literal["chat", "text"],
) -> Response:
    digest = service.request_digest(body, kind)
    retried = service.sdk_retry(request.headers)
    created = await service.create(state, key, job, idempotency_key, digest, retried, gate)
    reply = service.Reply.of(created.job, kind, body)
    if body.stream:
        return streaming.stream(state, key, reply)
    return await service.complete(request, state, key, reply)


@router.get("/models", response_model=ModelList)
async def models(key: CurrentKey, state: StateDep) -> ModelList:
    return service.model_list(state.registry)


@router.get("/models/{name:path}", response_model=ModelCard)
async def model(name: str, key: CurrentKey, state: StateDep) -> ModelCard:
    return service.model_card(state.registry, name)
