"""`inferq sim`: a TGI-compatible server with a simulated model, for development and tests.

Routes follow TGI 3.3 byte for byte where clients can tell: `POST /`, `/generate`,
`/generate_stream`, `/v1/chat/completions`, `GET /info`, `/health`, `/metrics`,
`/v1/models`. A token is a whitespace-separated word; output is deterministic for
(prompt, seed), and a request without a seed uses `SimConfig.seed`, even when sampling.

Latency follows continuous batching: time to first token is `ttft_ms +
prefill_ms_per_token * input_tokens (+ stall_ms)`, then every decode step gives each
running sequence one token and takes `itl_ms * (1 + batch_slowdown * (running - 1))`.
Past `max_concurrent_requests` admitted requests the answer is `overloaded`. A client
disconnect cancels its generation and frees its slot at once.

Faults (`overloaded`, `validation`, `generation`, `http500`, `disconnect`, `stall`, `cut`,
`abort`, `nul`, `garbage`):
- per request: header `X-Sim-Error: <mode>` (and `X-Sim-Stall-Ms` for `stall`);
- at runtime: `POST /sim/faults {"mode", "count", "stall_ms"}` gives the next `count`
  requests (every request, if `count` is null) that fault; `DELETE /sim/faults` clears;
- at random: `error_rate` fails that fraction of requests with a `generation` error.
`generation` and `disconnect` strike after three tokens; `http500` answers HTTP 500
`incomplete_generation` on every route; `stall` delays the first token. `cut`, `abort`
and `garbage` keep three tokens, then end the stream without its final event, finish with
reason `abort`, or send an event that is not JSON; `nul` puts a NUL in the first token.
`GET /sim/state` reports `{"active", "total_requests", "completed", "cancelled"}`.
"""

from sim.config import SimConfig
from sim.server import create_app, serve

__all__ = ["SimConfig", "create_app", "serve"]
