"""Phase 1: C closed-loop clients through the platform versus straight to the simulator."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httptools

from bench import clients
from bench.clients import Api, Request, Timing
from bench.config import StreamConfig
from bench.stats import Difference, Percentiles, ratio
from bench.wire import KeepAlive

Send = Callable[[int, Request], Awaitable[Timing]]  # (client index, request)
Tick = Callable[[], None]
# A request not finished after this many times its unloaded length (or the minimum) is lost.
DEADLINE_FACTOR = 20
MIN_DEADLINE_S = 60.0


@dataclass(frozen=True)
class LoopRun:
    timings: list[Timing]
    wall_s: float
    client_cpu_s: float  # this process's CPU over the run: near wall_s means client-bound


@dataclass(frozen=True)
class PathStats:
    """One path (platform or direct) at one concurrency."""

    requests: int
    errors: dict[str, int]
    ttft_ms: Percentiles
    itl_ms: Percentiles
    e2e_ms: Percentiles
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    submit_ms: Percentiles  # platform only: the POST /v1/jobs part of TTFT
    first_token_replayed: int  # platform only: see Timing.first_token_replayed

    client_cpu_share: float  # the bench process's CPU / wall: near 1.0, it was the bottleneck

    @classmethod
    def of(cls, run: LoopRun) -> PathStats:
        timings, wall_s = run.timings, run.wall_s
        ok = [t for t in timings if t.ok]
        tokens = sum(t.tokens for t in ok)
        return cls(
            requests=len(timings),
            errors=dict(Counter(t.error or "no token" for t in timings if not t.ok)),
            ttft_ms=Percentiles.of([t.ttft_ms for t in ok]),
            itl_ms=Percentiles.of([t.itl_ms for t in ok if t.itl_ms is not None]),
            e2e_ms=Percentiles.of([t.e2e_ms for t in ok]),
            output_tokens=tokens,
            wall_s=round(wall_s, 3),
            tokens_per_s=tokens / wall_s if wall_s else 0.0,
            submit_ms=Percentiles.of([t.submit_ms for t in ok if t.submit_ms is not None]),
            first_token_replayed=sum(t.first_token_replayed for t in ok),
            client_cpu_share=round(ratio(run.client_cpu_s, wall_s), 3),
        )


@dataclass(frozen=True)
class Overhead:
    """Platform minus direct (ms), and platform tokens/s over direct tokens/s."""

    ttft_ms: Difference
    itl_ms: Difference
    e2e_ms: Difference
    tokens_per_s_ratio: float


@dataclass(frozen=True)
class StreamLevel:
    concurrency: int
    requests_per_client: int
    direct: PathStats
    platform: PathStats
    overhead: Overhead


@dataclass(frozen=True)
class StreamTargets:
    """Where each path sends its requests."""

    api_url: str
    api_key: str
    model: str
    sim_url: str

    @property
    def api(self) -> Api:
        return Api(self.api_url, {"Authorization": f"Bearer {self.api_key}"})

    def platform_send(self, connections: list[KeepAlive]) -> Send:
        """Client i submits on its own kept-alive connection, then opens the job's events."""
        api = self.api

        def send(index: int, request: Request) -> Awaitable[Timing]:
            return clients.platform(connections[index], api, self.model, request)

        return send

    def direct_send(self) -> Send:
        return lambda _index, request: clients.direct(self.sim_url, request)

    def connections(self, count: int) -> contextlib.AbstractContextManager[list[KeepAlive]]:
        return KeepAlive.many(self.api_url, self.api.headers, count)


def make_request(config: StreamConfig, client: int, round_: int) -> Request:
    """The same prompt shape for both paths: a numbered prompt of `prompt_words` words."""
    words = " ".join(f"w{(client * 7 + i) % 97}" for i in range(config.prompt_words - 4))
    prompt = f"bench client {client} round {round_} {words}"
    return Request(prompt, config.sim.output_tokens, seed=client * 10_000 + round_)


async def closed_loop(send: Send, config: StreamConfig, clients_: int, tick: Tick) -> LoopRun:
    """`clients_` clients, starts staggered over one request's length."""
    rounds = config.requests_per_client(clients_)
    request_s = config.sim.request_s
    deadline_s = max(MIN_DEADLINE_S, DEADLINE_FACTOR * request_s)
    timings: list[Timing] = []

    async def client(index: int) -> None:
        await asyncio.sleep(request_s * index / clients_)
        for round_ in range(rounds):
            request = make_request(config, index, round_)
            timings.append(await _guarded(send, index, request, deadline_s))
            tick()

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client(i) for i in range(clients_)))
    return LoopRun(timings, time.perf_counter() - start, time.process_time() - cpu)


async def _guarded(send: Send, index: int, request: Request, deadline_s: float) -> Timing:
    """One request; a transport error or a request past its deadline is an error, not a crash.

    The deadline matters: a job whose worker task died stays `running` (no sweeper runs
    here), and its event stream stays open on keep-alive pings.
    """
    started = time.perf_counter()
    try:
        async with asyncio.timeout(deadline_s):
            return await send(index, request)
    except TimeoutError:
        return Timing(started, error=f"no end within {deadline_s:.0f}s")
    except (OSError, httptools.HttpParserError) as exc:
        return Timing(started, error=type(exc).__name__)


async def run_level(
    config: StreamConfig, targets: StreamTargets, clients_: int, tick: Tick
) -> StreamLevel:
    """Direct, then the platform, with the same clients and requests."""
    direct_run = await closed_loop(targets.direct_send(), config, clients_, tick)
    with targets.connections(clients_) as connections:
        platform_run = await closed_loop(targets.platform_send(connections), config, clients_, tick)
    direct, platform = PathStats.of(direct_run), PathStats.of(platform_run)
    overhead = Overhead(
        ttft_ms=platform.ttft_ms.minus(direct.ttft_ms),
        itl_ms=platform.itl_ms.minus(direct.itl_ms),
        e2e_ms=platform.e2e_ms.minus(direct.e2e_ms),
        tokens_per_s_ratio=ratio(platform.tokens_per_s, direct.tokens_per_s),
    )
    return StreamLevel(clients_, config.requests_per_client(clients_), direct, platform, overhead)


async def warm_up(config: StreamConfig, targets: StreamTargets) -> None:
    """A few unmeasured requests on each path: connections, caches, first-import costs."""
    requests = [make_request(config, 9_000 + i, 0) for i in range(config.warmup_requests)]
    with targets.connections(len(requests)) as connections:
        platform = targets.platform_send(connections)
        await asyncio.gather(*(platform(i, r) for i, r in enumerate(requests)))
    direct = targets.direct_send()
    await asyncio.gather(*(direct(i, r) for i, r in enumerate(requests)))


def total_requests(config: StreamConfig) -> int:
    """Requests of the whole phase, both paths (for the progress bar)."""
    return sum(2 * c * config.requests_per_client(c) for c in config.concurrency)


@dataclass(frozen=True)
class StreamResult:
    model: str
    note: str
    levels: list[StreamLevel]


NOTE = (
    "Closed loop: each client runs a fixed number of requests back to back (requests_per_client),"
    " client starts staggered over one request's length; direct first, then the platform, at each"
    " concurrency. TTFT: from the start of the submit request (platform) or of the"
    " /generate_stream request (direct) to the first token's arrival. ITL: per request"
    " (t_last - t_first) / (tokens - 1), tokens from done.usage.output_tokens (platform) or the"
    " token events (direct). Tokens/s: output tokens of the level over its wall time."
)
