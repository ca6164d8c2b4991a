"""TGI's generate routes: `/generate`, `/generate_stream` and the `/` compat route."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sim.errors import SimError
from sim.faults import Fault
from sim.model import Token, prefill_tokens
from sim.schemas import (
    CompatGenerateRequest,
    FaultMode,
    GenerateParameters,
    GenerateRequest,
)
from sim.service import Generation, Simulator
from sim.web import (
    GARBAGE_EVENT,
    KEEPALIVE_EVENT,
    KEEPALIVE_S,
    parse_body,
    simulator,
    sse_event,
    sse_response,
    wait_for_output,
)


async def generate(request: Request) -> Response:
    """`POST /generate`: the whole generation as one JSON object."""
    body = await parse_body(request, GenerateRequest)
    return await _generate_json(request, body, as_list=False)


async def generate_stream(request: Request) -> Response:
    """`POST /generate_stream`: one SSE event per token; errors arrive in the stream."""
    body = await parse_body(request, GenerateRequest)
    return _generate_sse(request, body)


async def compat_generate(request: Request) -> Response:
    """`POST /`: `return_full_text` defaults to true; `stream` picks the route."""
    body = await parse_body(request, CompatGenerateRequest)
    if body.parameters.return_full_text is None:
        params = body.parameters.model_copy(update={"return_full_text": True})
        body = body.model_copy(update={"parameters": params})
    if body.stream:
        return _generate_sse(request, body)
    return await _generate_json(request, body, as_list=True)


async def _generate_json(request: Request, body: GenerateRequest, *, as_list: bool) -> Response:
    sim = simulator(request)
    started = time.monotonic()
    fault = sim.accept(request.headers)
    generation = sim.start(body.inputs, body.parameters, fault, stream=False)
    early = await wait_for_output(request, sim, generation)
    if early is not None:
        return early
    payload = _generate_response(generation, body.parameters)
    headers = _timing_headers(generation, time.monotonic() - started, len(body.inputs))
    return JSONResponse([payload] if as_list else payload, headers=headers)


def _generate_response(generation: Generation, params: GenerateParameters) -> dict[str, object]:
    """TGI `GenerateResponse`; `details` only when asked for."""
    response: dict[str, object] = {"generated_text": _output_text(generation, params)}
    if params.details or params.decoder_input_details:
        plan = generation.plan
        response["details"] = {
            "finish_reason": plan.finish_reason,
            "generated_tokens": len(plan.tokens),
            "seed": generation.reported_seed,
            "prefill": prefill_tokens(generation.request.prompt)
            if params.decoder_input_details
            else [],
            "tokens": [token.as_dict() for token in plan.tokens],
        }
    return response


def _output_text(generation: Generation, params: GenerateParameters) -> str:
    prefix = generation.request.prompt if params.return_full_text else ""
    return prefix + generation.plan.text


def _timing_headers(generation: Generation, total_s: float, characters: int) -> dict[str, str]:
    """TGI's response headers for `/generate`."""
    total_ms = int(total_s * 1000)
    generated = len(generation.plan.tokens)
    return {
        "x-compute-type": "sim",
        "x-compute-time": f"{total_s:.6f}",
        "x-compute-characters": str(characters),
        "x-total-time": str(total_ms),
        "x-validation-time": "0",
        "x-queue-time": "0",
        "x-inference-time": str(total_ms),
        "x-time-per-token": str(total_ms // max(generated, 1)),
        "x-prompt-tokens": str(generation.request.input_length),
        "x-generated-tokens": str(generated),
    }


def _generate_sse(request: Request, body: GenerateRequest) -> Response:
    sim = simulator(request)
    fault = sim.accept(request.headers)
    return sse_response(_stream_events(sim, body, fault))


async def _stream_events(
    sim: Simulator, body: GenerateRequest, fault: Fault | None
) -> AsyncGenerator[bytes, None]:
    """The SSE body: token events, or a single error event."""
    try:
        generation = sim.start(
            body.inputs, body.parameters, fault, stream=True, keepalive_s=KEEPALIVE_S
        )
    except SimError as exc:
        yield sse_event(exc.payload())
        return
    try:
        async for token in generation.seq:
            if token is None:
                yield KEEPALIVE_EVENT
            else:
                yield sse_event(_token_event(generation, body.parameters, token))
        if generation.ending is FaultMode.GARBAGE:
            yield GARBAGE_EVENT
    except SimError as exc:
        yield sse_event(exc.payload())
    finally:
        sim.finish(generation)


def _token_event(
    generation: Generation, params: GenerateParameters, token: Token
) -> dict[str, object]:
    """TGI `StreamResponse`; only the last one carries the text and details."""
    final = generation.seq.complete and generation.ending is None
    return {
        "index": generation.seq.delivered,
        "token": token.as_dict(),
        "generated_text": _output_text(generation, params) if final else None,
        "details": _stream_details(generation) if final and params.details else None,
    }


def _stream_details(generation: Generation) -> dict[str, object]:
    """TGI `StreamDetails` of the last event."""
    return {
        "finish_reason": generation.plan.finish_reason,
        "generated_tokens": len(generation.plan.tokens),
        "seed": generation.reported_seed,
        "input_length": generation.request.input_length,
    }
