"""Phase 2: the front door alone; jobs go to a queue that no worker consumes.

Submits carry three kinds of keys in turn, as a shared platform sees them: the bootstrap
key (compared in memory, no lookup), API keys made through the admin API and used before
the level (in the API's key cache), and new keys made just before the level and first
used in its burst, whose first request misses every cache and is looked up in Postgres.
Each kind is reported on its own, the first request of a new key apart from its others.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import httptools
import httpx

from bench.config import SubmitConfig
from bench.stats import Percentiles
from bench.wire import KeepAlive

Tick = Callable[[], None]
WARMUP_JOBS = 20
MODEL = "void"  # a model whose queue no worker consumes
KNOWN_KEYS = 8
NEW_KEY_USES = 4  # each new key serves this many submits, close together
MAX_NEW_KEYS = 128  # per level; past them, the new-key turns go to known keys
KEY_TENANTS = 4
ADMIN_CONCURRENCY = 16
ADMIN_TIMEOUT = httpx.Timeout(30.0)


class KeyUse(enum.StrEnum):
    bootstrap = "bootstrap"
    known = "known key"  # made and used before the level
    new_first = "new key, first submit"  # the key's first request ever
    new_again = "new key, later submits"


# The turn of each submit, in order: one in three goes to a new key.
TURNS = (KeyUse.bootstrap, KeyUse.known, KeyUse.new_first)


@dataclass(frozen=True)
class KeyUseFigures:
    requests: int
    accepted: int
    errors: dict[str, int]
    latency_ms: Percentiles


@dataclass(frozen=True)
class SubmitLevel:
    api_processes: int
    concurrency: int
    jobs: int
    accepted: int
    errors: dict[str, int]
    wall_s: float
    jobs_per_s: float
    latency_ms: Percentiles
    client_cpu_share: float  # the bench process's CPU / wall: near 1.0, it was the bottleneck
    new_keys: int  # made through the admin API before the level, first used in it
    by_key: dict[str, KeyUseFigures]  # by KeyUse value
    # "mixed": the key uses above in turn; "no limits" / "limits": known keys only, without
    # and with limits (set too high to refuse), for the cost of checking them.
    keys: str = "mixed"


@dataclass(frozen=True)
class SubmitResult:
    model: str
    queue: str
    note: str
    levels: list[SubmitLevel]


@dataclass
class Keys:
    """Which key each submit carries; a new key is handed out NEW_KEY_USES times in a row."""

    bootstrap: str
    known: list[str]
    new: list[str]
    sent: set[str] = field(default_factory=set)

    def pick(self, index: int) -> tuple[KeyUse, str]:
        turn = TURNS[index % len(TURNS)]
        if turn is KeyUse.bootstrap:
            return turn, self.bootstrap
        slot = index // len(TURNS)
        if turn is KeyUse.new_first and slot // NEW_KEY_USES < len(self.new):
            key = self.new[slot // NEW_KEY_USES]
            first = key not in self.sent
            self.sent.add(key)
            return (KeyUse.new_first if first else KeyUse.new_again), key
        return KeyUse.known, self.known[slot % len(self.known)]


@dataclass
class KnownOnly(Keys):
    """Every submit carries one of the known keys, in turn."""

    def pick(self, index: int) -> tuple[KeyUse, str]:
        return KeyUse.known, self.known[index % len(self.known)]


# High enough never to refuse: every limit is checked, none is reached.
NEVER_REACHED = {
    "rate_limit_per_minute": 1_000_000_000,
    "tokens_per_minute": 1_000_000_000,
    "daily_budget_usd": 1_000_000,
    "max_queued": 1_000_000_000,
}


@dataclass
class Tally:
    """Latencies of accepted submits and errors, by key use."""

    latencies: defaultdict[KeyUse, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: defaultdict[KeyUse, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def figures(self) -> dict[str, KeyUseFigures]:
        uses = [use for use in KeyUse if use in self.latencies or use in self.errors]
        return {
            use.value: KeyUseFigures(
                requests=len(self.latencies[use]) + sum(self.errors[use].values()),
                accepted=len(self.latencies[use]),
                errors=dict(self.errors[use]),
                latency_ms=Percentiles.of(self.latencies[use]),
            )
            for use in uses
        }

    def all_latencies(self) -> list[float]:
        return [ms for values in self.latencies.values() for ms in values]

    def all_errors(self) -> dict[str, int]:
        return dict(sum(self.errors.values(), Counter()))


async def _submit_one(http: KeepAlive, keys: Keys, index: int, tally: Tally) -> None:
    use, key = keys.pick(index)
    body = {"model": MODEL, "prompt": f"submit {index}", "max_tokens": 16, "seed": index}
    payload = json.dumps(body).encode()
    started = time.perf_counter()
    try:
        status, _ = await http.post_json("/v1/jobs", payload, {"Authorization": f"Bearer {key}"})
    except (OSError, httptools.HttpParserError) as exc:
        tally.errors[use][type(exc).__name__] += 1
        return
    if status == 202:
        tally.latencies[use].append((time.perf_counter() - started) * 1000)
    else:
        tally.errors[use][f"HTTP {status}"] += 1


async def run_level(
    connections: list[KeepAlive],
    keys: Keys,
    api_processes: int,
    concurrency: int,
    jobs: int,
    tick: Tick,
) -> SubmitLevel:
    """`concurrency` closed-loop submitters, a connection each, share `jobs` submissions."""
    remaining = iter(range(jobs))
    tally = Tally()

    async def submitter(http: KeepAlive) -> None:
        for index in remaining:
            await _submit_one(http, keys, index, tally)
            tick()

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(submitter(connections[i]) for i in range(concurrency)))
    wall = time.perf_counter() - start
    latencies = tally.all_latencies()
    return SubmitLevel(
        api_processes=api_processes,
        concurrency=concurrency,
        jobs=jobs,
        accepted=len(latencies),
        errors=tally.all_errors(),
        wall_s=round(wall, 3),
        jobs_per_s=len(latencies) / wall if wall else 0.0,
        latency_ms=Percentiles.of(latencies),
        client_cpu_share=round((time.process_time() - cpu) / wall, 3) if wall else 0.0,
        new_keys=len(keys.new),
        by_key=tally.figures(),
    )


async def create_keys(
    api_url: str, admin_key: str, count: int, label: str, limits: dict[str, int] | None = None
) -> list[str]:
    """`count` API keys through the admin API, spread over a few tenants; their secrets."""
    limit = asyncio.Semaphore(ADMIN_CONCURRENCY)
    headers = {"Authorization": f"Bearer {admin_key}"}

    async def one(http: httpx.AsyncClient, index: int) -> str:
        tenant = f"bench-{index % KEY_TENANTS}"
        async with limit:
            body = {"name": f"{label}-{index}", "tenant": tenant, **(limits or {})}
            response = await http.post("/v1/admin/keys", json=body)
        response.raise_for_status()
        return str(response.json()["secret"])

    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=ADMIN_TIMEOUT) as http:
        return list(await asyncio.gather(*(one(http, i) for i in range(count))))


def new_key_count(jobs: int) -> int:
    """Enough new keys for every new-key turn of a level, up to MAX_NEW_KEYS."""
    turns = -(-jobs // len(TURNS))
    return min(MAX_NEW_KEYS, -(-turns // NEW_KEY_USES))


async def run(
    api_url: str, api_key: str, config: SubmitConfig, api_processes: int, tick: Tick
) -> list[SubmitLevel]:
    """Each level after the other, on the same kept-alive connections, after a warm-up.

    The known keys are made and used in the warm-up; each level's new keys are made just
    before it (outside its timing) and are first used in it.
    """
    known = await create_keys(api_url, api_key, KNOWN_KEYS, f"known-{api_processes}")
    widest = max(config.concurrency)
    results: list[SubmitLevel] = []
    with KeepAlive.many(api_url, {}, widest) as connections:
        # Enough warm-up submits for every known key to be used.
        warmup = max(WARMUP_JOBS, len(TURNS) * KNOWN_KEYS)
        warm = Keys(api_key, known, [])
        await run_level(connections, warm, api_processes, min(4, widest), warmup, lambda: None)
        for concurrency in config.concurrency:
            jobs = config.jobs_per_level
            label = f"new-{api_processes}-{concurrency}"
            new = await create_keys(api_url, api_key, new_key_count(jobs), label)
            keys = Keys(api_key, known, new)
            results.append(
                await run_level(connections, keys, api_processes, concurrency, jobs, tick)
            )
        results += await compare_limits(api_url, api_key, config, api_processes, connections)
    return results


async def compare_limits(
    api_url: str,
    api_key: str,
    config: SubmitConfig,
    api_processes: int,
    connections: list[KeepAlive],
) -> list[SubmitLevel]:
    """Known keys without limits, then known keys with every limit (never reached), in turn
    `limits_rounds` times at each client count: the machine's speed drifts, so each kind
    gets its share of every stretch of time."""
    plain = KnownOnly(api_key, await create_keys(api_url, api_key, KNOWN_KEYS, "plain"), [])
    limited = KnownOnly(
        api_key,
        await create_keys(api_url, api_key, KNOWN_KEYS, "limited", NEVER_REACHED),
        [],
    )
    warm = len(TURNS) * KNOWN_KEYS
    for keys in (plain, limited):  # into the API's key cache, and the scripts into Redis
        await run_level(connections, keys, api_processes, min(4, len(connections)), warm, _idle)
    levels = []
    for concurrency in config.limits_concurrency:
        for _ in range(config.limits_rounds):
            for label, keys in (("no limits", plain), ("limits", limited)):
                level = await run_level(
                    connections, keys, api_processes, concurrency, config.jobs_per_level, _idle
                )
                levels.append(replace(level, keys=label))
    return levels


def _idle() -> None:
    pass
