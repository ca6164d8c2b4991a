"""One timed request, through the platform (submit + SSE) or straight to the simulator.

Both paths use the lean clients of `wire` (httptools framing): with httpx and httpx-sse the
stream phase's load generator was the busiest single process of the run (0.2 of a core at
64 clients), on the cores the platform under test needs.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench.wire import Frame, KeepAlive, OnFrame, event_stream

# Explicit bounds: `read` is the longest gap between two events of one stream.
TIMEOUT = httpx.Timeout(connect=30.0, read=120.0, write=30.0, pool=300.0)


# httpx's connection pool costs more per request the more requests share it (measured here:
# 0.4 ms of client CPU per request with 8 users on one AsyncClient, 2.2 ms with 64), which
# would make the load generator the bottleneck; so each AsyncClient serves this many users.
USERS_PER_CLIENT = 8


class ClientShards:
    """One AsyncClient per `USERS_PER_CLIENT` simulated users, sharing one TLS context."""

    def __init__(self, users: int, **kwargs: Any) -> None:
        shards = max(1, -(-users // USERS_PER_CLIENT))
        limits = httpx.Limits(
            max_connections=USERS_PER_CLIENT * 2, max_keepalive_connections=USERS_PER_CLIENT * 2
        )
        tls = ssl.create_default_context()
        self._clients = [
            httpx.AsyncClient(limits=limits, timeout=TIMEOUT, verify=tls, **kwargs)
            for _ in range(shards)
        ]

    def __getitem__(self, user: int) -> httpx.AsyncClient:
        return self._clients[user // USERS_PER_CLIENT % len(self._clients)]

    async def __aenter__(self) -> ClientShards:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(client.aclose() for client in self._clients))


@dataclass
class Timing:
    """Clock readings of one request (time.perf_counter seconds) and its token count."""

    start: float
    first_token: float | None = None
    last_token: float | None = None
    end: float | None = None
    tokens: int = 0
    token_events: int = 0  # token events read (the platform's carry every token of a flush)
    submitted: float | None = None  # platform: when the 202 arrived
    job_id: str | None = None  # platform: the job the submit made
    # Platform: the first token was flushed before the event stream opened, so it came in the
    # replay and t_first is late (the request's mean ITL reads low).
    first_token_replayed: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.first_token is not None and self.end is not None

    @property
    def ttft_ms(self) -> float:
        assert self.first_token is not None
        return (self.first_token - self.start) * 1000

    @property
    def itl_ms(self) -> float | None:
        """Mean inter-token latency of the request; None with fewer than two tokens."""
        if self.tokens < 2 or self.first_token is None or self.last_token is None:
            return None
        return (self.last_token - self.first_token) * 1000 / (self.tokens - 1)

    @property
    def submit_ms(self) -> float | None:
        return None if self.submitted is None else (self.submitted - self.start) * 1000

    @property
    def e2e_ms(self) -> float:
        assert self.end is not None
        return (self.end - self.start) * 1000

    def token(self) -> None:
        self.token_events += 1
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        self.last_token = now


@dataclass(frozen=True)
class Request:
    """The same request shape for both paths."""

    prompt: str
    max_tokens: int
    seed: int

    def job(self, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "cache": False,
        }

    def tgi(self) -> dict[str, Any]:
        """What the platform's TGI backend sends for this job (workers/backends/tgi.py)."""
        parameters = {
            "max_new_tokens": self.max_tokens,
            "return_full_text": False,
            "seed": self.seed,
            "details": True,
            "do_sample": True,
        }
        return {"inputs": self.prompt, "parameters": parameters, "stream": True}


@dataclass(frozen=True)
class Api:
    """The platform's API as the stream clients call it."""

    url: str
    headers: dict[str, str]


async def platform(submits: KeepAlive, api: Api, model: str, request: Request) -> Timing:
    """Submit a job on the client's kept-alive connection, then read its events to the end;
    tokens from `done.usage`.
    """
    timing = Timing(time.perf_counter())
    status, body = await submits.post_json("/v1/jobs", json.dumps(request.job(model)).encode())
    timing.submitted = time.perf_counter()
    if status != 202:
        timing.error = f"submit {status}"
        return timing
    ended = asyncio.get_running_loop().create_future()
    # A token flushed before the events request was sent came in the replay.
    opened_ms = time.time() * 1000

    def on_frame(frame: Frame) -> None:
        if frame.event == "token":
            json.loads(frame.data)
            if timing.first_token is None:
                timing.first_token_replayed = _flush_ms(frame.id or "") < opened_ms
            timing.token()
        elif frame.event == "reset":
            timing.first_token = None
        elif frame.event in ("done", "error") and not ended.done():
            _finish_platform(timing, frame.event, json.loads(frame.data))
            ended.set_result(None)

    timing.job_id = json.loads(body)["id"]
    url = f"{api.url}/v1/jobs/{timing.job_id}/events"
    status = await read_until(ended, url, api.headers, on_frame)
    if status != 200:
        timing.error = f"events {status}"
    elif timing.end is None and timing.error is None:
        timing.error = "stream ended without done"
    return timing


async def read_until(
    ended: asyncio.Future[None],
    url: str,
    headers: dict[str, str],
    on_frame: OnFrame,
    json_body: bytes | None = None,
) -> int:
    """Open the event stream and feed `on_frame` until `ended` is set or the server ends it;
    the response status (nothing is read past a status other than 200)."""
    async with event_stream(url, headers, on_frame, json_body=json_body) as stream:
        if stream.status == 200:
            await asyncio.wait([ended, stream.finished], return_when=asyncio.FIRST_COMPLETED)
        return stream.status


def _flush_ms(event_id: str) -> int:
    """The Redis server time (ms) of the worker's flush, from the stream id "ms-seq"."""
    return int(event_id.partition("-")[0] or 0)


def _finish_platform(timing: Timing, kind: str, data: dict[str, Any]) -> None:
    timing.end = time.perf_counter()
    if kind == "error":
        timing.error = f"job error {data.get('type')}"
    elif data.get("status") != "succeeded":
        timing.error = f"job {data.get('status')}"
    else:
        timing.tokens = int((data.get("usage") or {}).get("output_tokens") or 0)


async def direct(sim_url: str, request: Request) -> Timing:
    """Read the simulator's /generate_stream; one SSE event per token, the last has the text."""
    timing = Timing(time.perf_counter())
    ended = asyncio.get_running_loop().create_future()

    def on_frame(frame: Frame) -> None:
        if ended.done():
            return
        data = json.loads(frame.data)
        if "error" in data:
            timing.error = f"backend {data.get('error_type')}"
            ended.set_result(None)
            return
        if not data["token"]["special"]:
            timing.token()
            timing.tokens += 1
        if data.get("generated_text") is not None:
            timing.end = time.perf_counter()
            ended.set_result(None)

    body = json.dumps(request.tgi()).encode()
    status = await read_until(ended, f"{sim_url}/generate_stream", {}, on_frame, body)
    if status != 200:
        timing.error = f"generate_stream {status}"
    elif timing.end is None and timing.error is None:
        timing.error = "stream ended without generated_text"
    return timing
