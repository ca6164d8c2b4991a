"""Fair share between tenants: one tenant's flood does not starve another's interactive job."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from typing import Any

import httpx
import pytest
import redis

from inferq import fairness
from inferq.queue import (
    ENQUEUED_KEY,
    PRIORITIES,
    Enqueue,
    Enqueuer,
    list_key,
    make_producer_app,
    redis_priority,
)
from inferq.resp import RespLink
from inferq.settings import Settings
from tests.conftest import Platform, submit
from tests.servers import Databases

FLOOD = 300
TOKENS = 20  # about half a second on model `slow` (25 ms a token)


def _body(i: int) -> dict[str, Any]:
    return {
        "model": "slow",
        "prompt": f"flood {i}",
        "max_tokens": TOKENS,
        "seed": i,
        "cache": False,
    }


async def _flood(platform: Platform, key: str) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=platform.api_url, headers=headers, timeout=60) as http:
        responses = await asyncio.gather(
            *(http.post("/v1/jobs", json=_body(i)) for i in range(FLOOD))
        )
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses[:3]]
    return [r.json()["id"] for r in responses]


def _drained(http: httpx.Client) -> bool:
    pending = (
        http.get("/v1/jobs", params={"status": s, "limit": 1}) for s in ("queued", "running")
    )
    return not any(r.json()["data"] for r in pending)


def _wait_drained(http: httpx.Client, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _drained(http):
        assert time.monotonic() < deadline, f"backlog not drained after {timeout}s"
        time.sleep(0.5)


def _all_jobs(http: httpx.Client) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = http.get("/v1/jobs", params=params).json()
        jobs += page["data"]
        if not page.get("next_cursor"):
            return jobs
        params["cursor"] = page["next_cursor"]


def _run_ms(job: dict[str, Any]) -> float:
    timings = job["timings"]
    return float(timings["duration_ms"] - timings["queue_ms"])


def test_light_tenant_is_not_starved_by_a_flood(platform: Platform) -> None:
    tenant = uuid.uuid4().hex[:8]
    key_a = platform.new_key(f"flood-{tenant}")
    key_b = platform.new_key(f"light-{tenant}")
    flood_ids = asyncio.run(_flood(platform, key_a))
    with platform.client(key_b) as http_b, platform.client(key_a) as http_a:
        light = submit(http_b, **_body(FLOOD))
        _wait_drained(http_a, timeout=240)
        _wait_drained(http_b, timeout=30)
        light = http_b.get(f"/v1/jobs/{light['id']}").json()
        flood = [j for j in _all_jobs(http_a) if j["id"] in set(flood_ids)]
    assert len(flood) == FLOOD and light["status"] == "succeeded"
    assert all(j["status"] == "succeeded" for j in flood)
    light_wait = light["timings"]["queue_ms"]
    flood_last_wait = max(j["timings"]["queue_ms"] for j in flood)
    job_ms = statistics.median(_run_ms(j) for j in flood)
    # Without fair share the light job waits behind the whole flood (~flood_last_wait).
    assert light_wait < flood_last_wait / 4, (light_wait, flood_last_wait, job_ms)
    assert light_wait < 8 * job_ms, (light_wait, flood_last_wait, job_ms)


# ---------------------------------------------------------------- the priority mapping


@pytest.mark.parametrize("priority", ["interactive", "batch"])
def test_light_load_keeps_the_requested_priority(priority: str) -> None:
    for load in range(1, fairness.LIGHT_LOAD + 1):
        assert redis_priority(priority, fairness.shift_for(load)) == PRIORITIES[priority]


def test_heavier_load_never_gets_a_higher_priority() -> None:
    shifts = [fairness.shift_for(load) for load in range(1, 5000)]
    assert shifts == sorted(shifts)
    assert shifts[-1] == fairness.MAX_SHIFT


def test_interactive_stays_ahead_of_batch_whatever_the_load() -> None:
    heaviest = redis_priority("interactive", fairness.MAX_SHIFT)
    assert heaviest < redis_priority("batch", 0)
    assert redis_priority("batch", fairness.MAX_SHIFT) <= 9


def test_shifted_job_lands_on_its_priority_list(databases: Databases) -> None:
    app = make_producer_app(Settings(redis_url=databases.redis_url))
    client = redis.Redis.from_url(databases.redis_url)
    queue = f"inferq.test-fair-{uuid.uuid4().hex[:8]}"
    try:
        Enqueuer(app).enqueue(client, [Enqueue("job-shifted", queue, "interactive", shift=2)])
        (stored,) = client.lrange(list_key(queue, 2), 0, -1)
        assert json.loads(stored)["properties"]["priority"] == 2
    finally:
        client.delete(list_key(queue, 2))
        client.zrem(ENQUEUED_KEY, "job-shifted")
        app.close()


async def _shifts(url: str, jobs: list[tuple[str, str]]) -> list[int]:
    link = RespLink(url)
    try:
        return await fairness.shifts(link, jobs)
    finally:
        await link.close()


def test_load_counts_a_tenants_jobs_across_batches_and_decays(databases: Databases) -> None:
    queue, heavy, light = "inferq.test-fair-load", uuid.uuid4().hex, uuid.uuid4().hex
    url = databases.redis_url
    first = asyncio.run(_shifts(url, [(queue, heavy)] * fairness.LIGHT_LOAD))
    mixed = asyncio.run(_shifts(url, [(queue, heavy)] * 3 + [(queue, light)]))
    assert first == [0] * fairness.LIGHT_LOAD
    assert mixed == [1, 1, 1, 0]  # the heavy tenant's 9th..11th jobs; the light one's first
    # Minutes later the heavy tenant's load has decayed: it is light again.
    key = fairness.load_key(queue, heavy)
    redis.Redis.from_url(url).hset(key, "at", time.time() - 30 * fairness.DECAY_SECONDS)
    assert asyncio.run(_shifts(url, [(queue, heavy)])) == [0]
