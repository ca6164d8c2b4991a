"""The response cache and queued jobs' positions, on the real platform."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from openai import OpenAI

from inferq import cache
from tests.conftest import BOOTSTRAP_KEY, Platform, submit, wait_for
from tests.servers import redis_client
from tests.sse import Transcript, read

JOB_HEADER = "x-inferq-job-id"


def _prompt() -> str:
    """A prompt no other test sends: its first request is a miss."""
    return f"Describe queue {uuid.uuid4().hex[:8]}"


def _requests(platform: Platform, sim: str = "fast") -> int:
    return int(platform.sims[sim].state()["total_requests"])


def _run(http: httpx.Client, **body: Any) -> dict[str, Any]:
    return wait_for(http, submit(http, **body)["id"])


@pytest.fixture
def client(platform: Platform) -> Iterator[OpenAI]:
    with OpenAI(
        base_url=f"{platform.api_url}/v1", api_key=BOOTSTRAP_KEY, max_retries=0, timeout=60
    ) as sync_client:
        yield sync_client


def test_identical_seeded_request_is_answered_from_the_cache(
    http: httpx.Client, platform: Platform
) -> None:
    body = {"prompt": _prompt(), "max_tokens": 12, "seed": 5}
    first = _run(http, **body)
    assert first["status"] == "succeeded" and first["cached"] is False
    before = _requests(platform)
    hit = submit(http, **body)  # answered at once: already finished in the 202
    assert _requests(platform) == before  # the backend was not called
    assert hit["status"] == "succeeded"
    assert hit["cached"] is True
    assert hit["id"] != first["id"]
    assert hit["output"] == first["output"] and hit["output"]
    assert hit["finish_reason"] == first["finish_reason"]
    assert hit["usage"] == {**first["usage"], "cost_usd": 0}
    assert first["usage"]["cost_usd"] > 0
    assert hit["started_at"] and hit["finished_at"]
    assert wait_for(http, hit["id"])["cached"] is True
    transcript = read(http, hit["id"], Transcript())
    assert transcript.output() == first["output"]
    assert transcript.events[-1].event == "done"
    assert (
        transcript.of_type("done")[0]["usage"]["output_tokens"] == first["usage"]["output_tokens"]
    )
    metrics = httpx.get(f"{platform.api_url}/metrics").text
    assert 'inferq_cache_hits_total{model="sim"}' in metrics
    assert 'inferq_cache_misses_total{model="sim"}' in metrics


def test_openai_routes_work_on_a_hit(
    client: OpenAI, http: httpx.Client, platform: Platform
) -> None:
    messages: Any = [{"role": "user", "content": _prompt()}]
    first = client.chat.completions.create(model="sim", messages=messages, max_tokens=10, seed=2)
    before = _requests(platform)
    raw = client.chat.completions.with_raw_response.create(
        model="sim", messages=messages, max_tokens=10, seed=2, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
    assert text == first.choices[0].message.content
    assert http.get(f"/v1/jobs/{raw.headers[JOB_HEADER]}").json()["cached"] is True
    again = client.chat.completions.with_raw_response.create(
        model="sim", messages=messages, max_tokens=10, seed=2
    )
    completion = again.parse()
    assert completion.choices[0].message.content == first.choices[0].message.content
    assert completion.usage is not None and first.usage is not None
    assert completion.usage.completion_tokens == first.usage.completion_tokens
    assert http.get(f"/v1/jobs/{again.headers[JOB_HEADER]}").json()["cached"] is True
    assert _requests(platform) == before


def test_sampled_request_is_never_cached(http: httpx.Client, platform: Platform) -> None:
    body = {"prompt": _prompt(), "max_tokens": 6, "temperature": 0.7}
    before = _requests(platform)
    jobs = [_run(http, **body) for _ in range(2)]
    assert [j["cached"] for j in jobs] == [False, False]
    assert all(j["status"] == "succeeded" for j in jobs)
    assert _requests(platform) - before == 2


def test_greedy_request_on_tgi_is_cached_without_a_seed(http: httpx.Client) -> None:
    body = {"prompt": _prompt(), "max_tokens": 6}
    assert _run(http, **body)["cached"] is False
    assert submit(http, **body)["cached"] is True


def test_cache_never_crosses_tenants(http: httpx.Client, platform: Platform) -> None:
    body = {"prompt": _prompt(), "max_tokens": 6, "seed": 1}
    for tenant in (f"cache-a-{uuid.uuid4().hex[:6]}", f"cache-b-{uuid.uuid4().hex[:6]}"):
        with platform.client(platform.new_key(tenant)) as tenant_http:
            assert _run(tenant_http, **body)["cached"] is False
            assert submit(tenant_http, **body)["cached"] is True


def test_cache_false_bypasses_it(http: httpx.Client, platform: Platform) -> None:
    body = {"prompt": _prompt(), "max_tokens": 6, "seed": 4}
    # Not stored either: the next cacheable request is a miss.
    assert _run(http, **body, cache=False)["cached"] is False
    assert _run(http, **body)["cached"] is False
    before = _requests(platform)
    bypass = _run(http, **body, cache=False)
    assert bypass["cached"] is False and bypass["status"] == "succeeded"
    assert _requests(platform) - before == 1
    assert submit(http, **body)["cached"] is True


def test_failed_job_is_not_cached(http: httpx.Client, platform: Platform) -> None:
    body = {"model": "faulty", "prompt": _prompt(), "max_tokens": 6, "seed": 9}
    platform.sims["faulty"].fault("validation", count=1)
    failed = _run(http, **body)
    assert failed["status"] == "failed"
    retried = _run(http, **body)
    assert retried["status"] == "succeeded" and retried["cached"] is False
    assert submit(http, **body)["cached"] is True


def _position(http: httpx.Client, job_id: str) -> int:
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "queued"
    assert "eta_seconds" in job
    return int(job["queue_position"])


def test_queue_position_counts_the_jobs_that_run_first(http: httpx.Client) -> None:
    """`parked` has no worker: its jobs stay queued."""
    jobs = [submit(http, model="parked", prompt=_prompt(), max_tokens=4)["id"] for _ in range(3)]
    try:
        base = _position(http, jobs[0])
        assert [_position(http, j) for j in jobs] == [base, base + 1, base + 2]
        batch = submit(http, model="parked", prompt=_prompt(), max_tokens=4, priority="batch")
        jobs.append(batch["id"])
        assert _position(http, batch["id"]) >= base + 3
        later = submit(http, model="parked", prompt=_prompt(), max_tokens=4)["id"]
        jobs.append(later)
        # An interactive job submitted after the batch one still runs before it.
        assert _position(http, later) == base + 3
        assert _position(http, batch["id"]) >= base + 4
        # Nothing started on `parked` lately: no estimate.
        assert http.get(f"/v1/jobs/{later}").json()["eta_seconds"] is None
        http.post(f"/v1/jobs/{jobs[0]}/cancel").raise_for_status()
        assert _position(http, jobs[1]) == base
    finally:
        for job_id in jobs:
            http.post(f"/v1/jobs/{job_id}/cancel")
    assert http.get(f"/v1/jobs/{jobs[0]}").json()["queue_position"] is None


def test_eta_follows_the_models_recent_starts(platform: Platform) -> None:
    redis = redis_client(platform.redis_url)
    model = f"eta-{uuid.uuid4().hex[:6]}"
    for _ in range(30):
        cache.count_start(redis, model)
    rate = _rate(platform, model)
    assert rate > 0
    eta = cache.eta_seconds(9, rate)
    assert eta is not None and eta == pytest.approx(10 / rate, rel=0.05)
    assert cache.eta_seconds(9, 0.0) is None


def _rate(platform: Platform, model: str) -> float:
    async def read_rate() -> float:
        client = aioredis.Redis.from_url(platform.redis_url)
        try:
            return await cache.starts_per_second(client, model)
        finally:
            await client.aclose()

    return asyncio.run(read_rate())


def test_hit_with_an_idempotency_key_is_one_job(http: httpx.Client) -> None:
    body = {"model": "sim", "prompt": _prompt(), "max_tokens": 6, "seed": 3}
    _run(http, **body)
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    first = http.post("/v1/jobs", json=body, headers=headers)
    again = http.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["cached"] is True and first.json()["status"] == "succeeded"
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert read(http, first.json()["id"], Transcript()).output() == first.json()["output"]
