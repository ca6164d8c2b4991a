"""The benchmark's parameters: the full run and the smoke run, recorded in the result."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace


class Phase(enum.StrEnum):
    stream = "stream"
    submit = "submit"
    fanout = "fanout"
    scale = "scale"
    fairness = "fairness"
    relay = "relay"


@dataclass(frozen=True)
class SimParams:
    """A simulator's latency model: fixed TTFT, fixed ITL, fixed output length."""

    ttft_ms: float
    itl_ms: float
    output_tokens: int
    max_concurrent_requests: int
    # Zero: the inter-token latency does not grow with the batch, so it stays fixed.
    batch_slowdown: float = 0.0
    prefill_ms_per_token: float = 0.0

    @property
    def request_s(self) -> float:
        """How long one request takes on an idle server."""
        return (self.ttft_ms + self.itl_ms * (self.output_tokens - 1)) / 1000

    def args(self) -> list[str]:
        """Flags for `inferq sim` (`python -m sim`)."""
        return [
            "--ttft-ms",
            str(self.ttft_ms),
            "--itl-ms",
            str(self.itl_ms),
            "--fixed-output-tokens",
            str(self.output_tokens),
            "--max-concurrent-requests",
            str(self.max_concurrent_requests),
            "--batch-slowdown",
            str(self.batch_slowdown),
            "--prefill-ms-per-token",
            str(self.prefill_ms_per_token),
        ]


@dataclass(frozen=True)
class StreamConfig:
    """Closed loop: each of C clients runs `requests_per_client(C)` requests back to back."""

    sim: SimParams
    concurrency: tuple[int, ...]
    min_requests: int  # per level, within the bounds on rounds below
    min_rounds: int
    max_rounds: int
    prompt_words: int = 32
    warmup_requests: int = 4

    def requests_per_client(self, clients: int) -> int:
        rounds = -(-self.min_requests // clients)
        return min(self.max_rounds, max(self.min_rounds, rounds))


@dataclass(frozen=True)
class SubmitConfig:
    concurrency: tuple[int, ...]
    jobs_per_level: int
    # The platform's own API process, then one started with `inferq api --workers N` for
    # each further N: how the front door grows with the processes of one host.
    api_processes: tuple[int, ...] = (1, 2)
    # Keys with limits set too high to refuse against keys with none, alternately this many
    # times at each of these client counts: what checking the limits costs a submit.
    limits_concurrency: tuple[int, ...] = (8, 32)
    limits_rounds: int = 3


@dataclass(frozen=True)
class FanoutConfig:
    sim: SimParams
    clients: int
    jobs: int
    client_processes: int
    ramp_s: float  # clients connect spread over this window
    hold_s: float  # then delivery lag is measured over this window


@dataclass(frozen=True)
class ScaleConfig:
    sim: SimParams
    workers: tuple[int, ...]
    worker_concurrency: int
    jobs_per_worker: int
    submitters: int = 32


@dataclass(frozen=True)
class FairnessConfig:
    sim: SimParams
    flood_jobs: int  # tenant A's, submitted at once; then tenant B submits one
    worker_slots: int  # the phase's worker threads: the backlog is flood_jobs / worker_slots


@dataclass(frozen=True)
class RelayConfig:
    """A worker against a fast backend: its own simulators (one per inter-token latency), API
    and worker; each level's clients run closed loops straight to the simulator, then through
    the platform, then a bare reader reads the same streams (the CPU floor of a token)."""

    levels: tuple[tuple[int, float], ...]  # (clients, inter-token latency in ms)
    ttft_ms: float
    output_tokens: int
    min_requests: int  # per level and path, within the bounds on rounds below
    min_rounds: int
    max_rounds: int
    burst: int  # streams a fresh worker is given at once, then the warm one the same
    processes: int | None = None  # the worker's --processes (None: its default)
    streams: str | None = None  # the worker's INFERQ_WORKER_STREAMS (None: its default)
    max_concurrent_requests: int = 320

    def stream(self, clients: int, itl_ms: float) -> StreamConfig:
        sim = SimParams(
            ttft_ms=self.ttft_ms,
            itl_ms=itl_ms,
            output_tokens=self.output_tokens,
            max_concurrent_requests=self.max_concurrent_requests,
        )
        return StreamConfig(
            sim=sim,
            concurrency=(clients,),
            min_requests=self.min_requests,
            min_rounds=self.min_rounds,
            max_rounds=self.max_rounds,
        )

    @property
    def concurrency(self) -> int:
        """The worker's threads: every client of the largest level at once, and a margin."""
        return max(max(clients for clients, _ in self.levels), self.burst) + 8


@dataclass(frozen=True)
class BenchConfig:
    name: str
    stream: StreamConfig
    submit: SubmitConfig
    fanout: FanoutConfig
    scale: ScaleConfig
    fairness: FairnessConfig
    relay: RelayConfig
    phases: tuple[Phase, ...] = field(default=tuple(Phase))
    # Celery's threads pool is one process, so one core of Python: a node that must carry
    # thousands of tokens a second runs a worker process per core.
    worker_processes: int = 2

    @property
    def worker_concurrency(self) -> int:
        """Threads per stream worker: together they run every client's job at once."""
        return -(-max(self.stream.concurrency) // self.worker_processes) + 8

    @classmethod
    def full(cls) -> BenchConfig:
        return cls(
            name="full",
            stream=StreamConfig(
                sim=SimParams(ttft_ms=50, itl_ms=20, output_tokens=64, max_concurrent_requests=320),
                concurrency=(1, 16, 64, 256),
                min_requests=192,
                min_rounds=3,
                max_rounds=16,
            ),
            submit=SubmitConfig(concurrency=(1, 8, 32, 64), jobs_per_level=2000),
            fanout=FanoutConfig(
                sim=SimParams(
                    ttft_ms=50, itl_ms=200, output_tokens=2000, max_concurrent_requests=64
                ),
                clients=5000,
                jobs=10,
                client_processes=4,
                ramp_s=40,
                hold_s=20,
            ),
            scale=ScaleConfig(
                sim=SimParams(ttft_ms=50, itl_ms=20, output_tokens=32, max_concurrent_requests=8),
                workers=(1, 2, 3),
                worker_concurrency=8,
                jobs_per_worker=96,
            ),
            fairness=FairnessConfig(
                sim=SimParams(ttft_ms=20, itl_ms=25, output_tokens=20, max_concurrent_requests=64),
                flood_jobs=300,
                worker_slots=16,
            ),
            relay=RelayConfig(
                levels=((64, 10.0), (256, 20.0)),
                ttft_ms=50,
                output_tokens=64,
                min_requests=256,
                min_rounds=3,
                max_rounds=16,
                burst=64,
            ),
        )

    @classmethod
    def smoke(cls) -> BenchConfig:
        return cls(
            name="smoke",
            stream=StreamConfig(
                sim=SimParams(ttft_ms=10, itl_ms=5, output_tokens=8, max_concurrent_requests=32),
                concurrency=(1, 4),
                min_requests=4,
                min_rounds=1,
                max_rounds=4,
                warmup_requests=1,
            ),
            submit=SubmitConfig(
                concurrency=(1, 4), jobs_per_level=20, limits_concurrency=(4,), limits_rounds=1
            ),
            fanout=FanoutConfig(
                sim=SimParams(ttft_ms=10, itl_ms=50, output_tokens=400, max_concurrent_requests=8),
                clients=50,
                jobs=2,
                client_processes=2,
                ramp_s=1.0,
                hold_s=1.5,
            ),
            scale=ScaleConfig(
                sim=SimParams(ttft_ms=10, itl_ms=5, output_tokens=8, max_concurrent_requests=4),
                workers=(1, 2),
                worker_concurrency=4,
                jobs_per_worker=8,
                submitters=8,
            ),
            fairness=FairnessConfig(
                sim=SimParams(ttft_ms=10, itl_ms=10, output_tokens=10, max_concurrent_requests=8),
                flood_jobs=40,
                worker_slots=4,
            ),
            relay=RelayConfig(
                levels=((4, 5.0), (8, 5.0)),
                ttft_ms=10,
                output_tokens=8,
                min_requests=8,
                min_rounds=1,
                max_rounds=2,
                burst=4,
                processes=2,
            ),
            worker_processes=1,
        )

    def with_phases(self, phases: tuple[Phase, ...]) -> BenchConfig:
        return replace(self, phases=phases)
