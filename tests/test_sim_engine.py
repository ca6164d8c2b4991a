"""The simulator's engine as a route drains it (tokens in order, keep-alives only in silence),
and its events' bytes."""

from __future__ import annotations

import asyncio
import json
from itertools import pairwise

from sim.config import SimConfig
from sim.engine import TIMER_SLACK_S, Engine, Job
from sim.model import plan_generation
from sim.web import sse_event


def _job(tokens: int, prefill_s: float, keepalive_s: float | None) -> Job:
    plan = plan_generation("engine test", seed=7, max_new_tokens=tokens, fixed_output_tokens=tokens)
    return Job(plan=plan, input_length=2, prefill_s=prefill_s, keepalive_s=keepalive_s)


async def _drain(engine: Engine, job: Job) -> list[tuple[float, object]]:
    """Every item the sequence yields (None for a keep-alive), with the loop's time of it."""
    loop = asyncio.get_running_loop()
    seq = engine.submit(job)
    try:
        return [(loop.time(), item) async for item in seq]
    finally:
        engine.release(seq)


async def test_a_silent_prefill_gets_keepalives_at_the_interval_and_then_every_token() -> None:
    engine = Engine(SimConfig(itl_ms=5.0, batch_slowdown=0.0))
    job = _job(tokens=6, prefill_s=0.35, keepalive_s=0.1)
    started = asyncio.get_running_loop().time()
    try:
        drained = await _drain(engine, job)
    finally:
        await engine.stop()
    items = [item for _, item in drained]
    count = items.index(next(i for i in items if i is not None))
    assert count in (2, 3)  # at 0.1, 0.2 and 0.3 s of the prefill, unless the loop was late
    assert items[count:] == list(job.plan.tokens)
    times = [started] + [at for at, _ in drained[:count]]
    assert all(later - earlier >= 0.1 - 2 * TIMER_SLACK_S for earlier, later in pairwise(times))


async def test_tokens_closer_than_the_keepalive_interval_have_no_keepalive_between_them() -> None:
    engine = Engine(SimConfig(itl_ms=20.0, batch_slowdown=0.0))
    jobs = [_job(tokens=30, prefill_s=0.01, keepalive_s=0.05) for _ in range(3)]
    try:
        drained = await asyncio.gather(*(_drain(engine, job) for job in jobs))
    finally:
        await engine.stop()
    for job, items in zip(jobs, drained, strict=True):
        assert [item for _, item in items] == list(job.plan.tokens)


def test_events_are_compact_utf8_json_as_serde_json_writes_it() -> None:
    plan = plan_generation("wire bytes", seed=3, max_new_tokens=200)
    payloads: list[object] = [
        {"index": i, "token": token.as_dict(), "generated_text": None, "details": None}
        for i, token in enumerate(plan.tokens, 1)
    ]
    payloads += [
        {"token": {"id": 7, "text": " caf\u00e9 \u2028 \u65e5\u672c \U0001f600", "logprob": -0.0}},
        {"text": 'quote " back\\slash \n\t\r\b\f \x01 \x7f', "seed": 2**64 - 1, "n": -3},
        {"error": "Input validation error", "error_type": "validation", "nested": [1, 2.5, None]},
    ]
    for payload in payloads:
        compact = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        assert sse_event(payload) == f"data: {compact}\n\n".encode()
