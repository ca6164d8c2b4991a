"""TGI's Messages API: `POST /v1/chat/completions`."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sim.config import TGI_VERSION
from sim.errors import SimError
from sim.faults import Fault
from sim.model import Token, render_chat
from sim.schemas import ChatRequest, FaultMode
from sim.service import Generation, Simulator
from sim.web import (
    DONE_EVENT,
    GARBAGE_EVENT,
    KEEPALIVE_EVENT,
    KEEPALIVE_S,
    parse_body,
    simulator,
    sse_event,
    sse_response,
    wait_for_output,
)

SYSTEM_FINGERPRINT = f"{TGI_VERSION}-native"


async def chat_completions(request: Request) -> Response:
    """Chat completion, streamed as `chat.completion.chunk` events or as one object."""
    body = await parse_body(request, ChatRequest)
    sim = simulator(request)
    fault = sim.accept(request.headers)
    if body.stream:
        return sse_response(_chunk_events(sim, body, fault))
    return await _completion(request, sim, body, fault)


def _prompt(body: ChatRequest) -> str:
    return render_chat((message.role, message.text) for message in body.messages)


def _finish_reason(generation: Generation) -> str:
    """Chat APIs call the eos finish `stop`."""
    reason = generation.plan.finish_reason
    return "stop" if reason == "eos_token" else reason


def _final(generation: Generation) -> bool:
    """Whether the last token was delivered and the stream ends as it should."""
    return generation.seq.complete and generation.ending is None


def _usage(generation: Generation) -> dict[str, int]:
    prompt_tokens = generation.request.input_length
    completion_tokens = len(generation.plan.tokens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _logprobs(tokens: list[Token]) -> dict[str, object]:
    return {
        "content": [
            {"token": token.text, "logprob": token.logprob, "top_logprobs": []} for token in tokens
        ]
    }


def _envelope(sim: Simulator, kind: str) -> dict[str, object]:
    return {
        "object": kind,
        "id": "",
        "created": int(time.time()),
        "model": sim.config.model_id,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


async def _completion(
    request: Request, sim: Simulator, body: ChatRequest, fault: Fault | None
) -> Response:
    generation = sim.start(_prompt(body), body.to_parameters(), fault, stream=False)
    early = await wait_for_output(request, sim, generation)
    if early is not None:
        return early
    return JSONResponse(_completion_object(sim, generation, body))


def _completion_object(
    sim: Simulator, generation: Generation, body: ChatRequest
) -> dict[str, object]:
    """TGI `ChatCompletion`."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": generation.plan.text},
        "logprobs": _logprobs(list(generation.plan.tokens)) if body.logprobs else None,
        "finish_reason": _finish_reason(generation),
    }
    return {
        **_envelope(sim, "chat.completion"),
        "choices": [choice],
        "usage": _usage(generation),
    }


async def _chunk_events(
    sim: Simulator, body: ChatRequest, fault: Fault | None
) -> AsyncGenerator[bytes, None]:
    """The SSE body: chunks (plus a usage chunk if asked), or an error; then `[DONE]`."""
    try:
        generation = sim.start(
            _prompt(body), body.to_parameters(), fault, stream=True, keepalive_s=KEEPALIVE_S
        )
    except SimError as exc:
        yield sse_event(exc.openai_payload())
        yield DONE_EVENT
        return
    try:
        async for token in generation.seq:
            if token is None:
                yield KEEPALIVE_EVENT
            else:
                yield sse_event(_chunk(sim, generation, body, token))
        if generation.ending is FaultMode.GARBAGE:
            yield GARBAGE_EVENT
        elif generation.ending is None and _include_usage(body):
            yield sse_event(_usage_chunk(sim, generation))
    except SimError as exc:
        yield sse_event(exc.openai_payload())
    finally:
        sim.finish(generation)
    yield DONE_EVENT


def _include_usage(body: ChatRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _usage_chunk(sim: Simulator, generation: Generation) -> dict[str, object]:
    """The extra chunk `include_usage` asks for: usage and no choices."""
    return {**_envelope(sim, "chat.completion.chunk"), "choices": [], "usage": _usage(generation)}


def _chunk(
    sim: Simulator, generation: Generation, body: ChatRequest, token: Token
) -> dict[str, object]:
    """TGI `ChatCompletionChunk` for one token; special tokens carry empty content."""
    choice = {
        "index": 0,
        "delta": {"role": "assistant", "content": "" if token.special else token.text},
        "logprobs": _logprobs([token]) if body.logprobs else None,
        "finish_reason": _finish_reason(generation) if _final(generation) else None,
    }
    return {**_envelope(sim, "chat.completion.chunk"), "choices": [choice], "usage": None}
