"""Routes about the server: info, health, metrics, models, and the `/sim` controls."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from sim.config import TGI_VERSION
from sim.model import tokenize as tokenize_text
from sim.schemas import FaultRequest, GenerateRequest
from sim.service import Simulator
from sim.web import parse_body, simulator


async def info(request: Request) -> Response:
    """`GET /info`: TGI's `Info` fields."""
    config = simulator(request).config
    return JSONResponse(
        {
            "model_id": config.model_id,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": config.max_concurrent_requests,
            "max_best_of": 2,
            "max_stop_sequences": config.max_stop_sequences,
            "max_input_tokens": config.max_input_tokens,
            "max_total_tokens": config.max_total_tokens,
            "validation_workers": 2,
            "max_client_batch_size": 4,
            "router": "text-generation-router",
            "version": TGI_VERSION,
            "sha": None,
            "docker_label": None,
        }
    )


async def tokenize(request: Request) -> Response:
    """`POST /tokenize`: TGI's answer, a list of `{id, text, start, stop}` for `inputs`."""
    body = await parse_body(request, GenerateRequest)
    sim = simulator(request)
    sim.stats.tokenize_requests += 1
    return JSONResponse(tokenize_text(body.inputs))


async def last_request(request: Request) -> Response:
    """`GET /sim/last_request`: the input of the last admitted generation and its length."""
    stats = simulator(request).stats
    return JSONResponse({"inputs": stats.last_prompt, "input_length": stats.last_input_length})


async def health(request: Request) -> Response:
    """`GET /health`: 200 with an empty body."""
    return Response(status_code=200)


async def models(request: Request) -> Response:
    """`GET /v1/models`: the one served model."""
    model_id = simulator(request).config.model_id
    entry = {"id": model_id, "object": "model", "created": 0, "owned_by": model_id}
    return JSONResponse({"object": "list", "data": [entry]})


async def metrics(request: Request) -> Response:
    """`GET /metrics`: Prometheus text with TGI's main series and the simulator's."""
    return PlainTextResponse(
        render_metrics(simulator(request)), media_type="text/plain; version=0.0.4"
    )


def render_metrics(sim: Simulator) -> str:
    """The Prometheus exposition of the simulator's state."""
    engine, stats = sim.engine, sim.stats
    lines = [
        *_series("tgi_request_count", "counter", stats.total_requests),
        *_series("tgi_request_success", "counter", stats.completed),
        "# TYPE tgi_request_failure counter",
        *(f'tgi_request_failure{{err="{err}"}} {n}' for err, n in sorted(stats.failures.items())),
        *_series("tgi_queue_size", "gauge", engine.queue_size),
        *_series("tgi_batch_current_size", "gauge", engine.batch_size),
        *_series("inferq_sim_generated_tokens", "counter", stats.generated_tokens),
        *_series("inferq_sim_active_generations", "gauge", engine.active),
        *_series("inferq_sim_cancelled", "counter", stats.cancelled),
    ]
    return "\n".join(lines) + "\n"


def _series(name: str, kind: str, value: int) -> tuple[str, str]:
    return f"# TYPE {name} {kind}", f"{name} {value}"


async def sim_state(request: Request) -> Response:
    """`GET /sim/state`: slots held and request outcomes."""
    sim = simulator(request)
    stats = sim.stats
    return JSONResponse(
        {
            "active": sim.engine.active,
            "total_requests": stats.total_requests,
            "completed": stats.completed,
            "cancelled": stats.cancelled,
            "tokenize_requests": stats.tokenize_requests,
        }
    )


async def get_faults(request: Request) -> Response:
    """`GET /sim/faults`: the scheduled fault."""
    return JSONResponse(simulator(request).faults.state())


async def set_faults(request: Request) -> Response:
    """`POST /sim/faults`: give the next `count` requests (null: all) the fault `mode`."""
    body = await parse_body(request, FaultRequest)
    faults = simulator(request).faults
    faults.schedule(body)
    return JSONResponse(faults.state())


async def clear_faults(request: Request) -> Response:
    """`DELETE /sim/faults`: no more scheduled faults."""
    faults = simulator(request).faults
    faults.clear()
    return JSONResponse(faults.state())
