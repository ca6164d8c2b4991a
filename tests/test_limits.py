"""Per-key limits on the real stack: 429s with Retry-After, recovery, shared counters.

The per-minute limits are tested on API processes of their own whose window is 3 s
(INFERQ_LIMIT_WINDOW_SECONDS), started in step with the window so that a burst of a few
requests falls within one window. Their models file adds priced models: `pricey` on the slow
simulator (served by a worker of this module) and `pricey-parked` (served by none: its jobs
stay queued until cancelled).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferq import lifecycle
from inferq.db import make_sync_engine
from inferq.limits import counters_prefix, reservation_key
from tests.conftest import MODELS, Platform, wait_for
from tests.servers import free_port, redis_client, wait_http

WINDOW = 3
LIMITED_MODELS = """
[models.pricey]
backend = "tgi"
url = "{slow}"
max_tokens = 400
price_input_per_mtok = 0
price_output_per_mtok = 100

[models.pricey-parked]
backend = "tgi"
url = "{slow}"
max_tokens = 16
price_input_per_mtok = 0
price_output_per_mtok = 100
"""
RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


@dataclass
class LimitsApis:
    urls: list[str]  # two API processes with a 3 s window, on one Redis


@pytest.fixture(scope="module")
def apis(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitsApis]:
    models = _models_file(platform, tmp_path_factory.mktemp("limits"))
    env = {"INFERQ_LIMIT_WINDOW_SECONDS": str(WINDOW), "INFERQ_MODELS_FILE": str(models)}
    urls, processes = [], []
    for name in ("api-limits", "api-limits-2"):
        port = free_port()
        process = platform.spawn("api", "--port", str(port), name=name, **env)
        processes.append(process)
        wait_http(f"http://127.0.0.1:{port}/readyz", process)
        urls.append(f"http://127.0.0.1:{port}")
    platform.worker("limits", "pricey", concurrency=4, **env)
    yield LimitsApis(urls)
    for process in processes:  # their hubs would count as the next tests' subscriptions
        process.stop()


def _models_file(platform: Platform, where: Path) -> Path:
    sims = platform.sims
    text = MODELS.format(
        fast=sims["fast"].url, slow=sims["slow"].url, faulty=sims["faulty"].url, closed=free_port()
    )
    path = where / "models.toml"
    path.write_text(text + LIMITED_MODELS.format(slow=sims["slow"].url))
    return path


def new_key(platform: Platform, **limits: Any) -> str:
    return made_key(platform, **limits)["secret"]


def made_key(platform: Platform, **limits: Any) -> dict[str, Any]:
    with platform.client() as http:
        body = {"name": "limited", "tenant": "limits", **limits}
        response = http.post("/v1/admin/keys", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())


def counters(platform: Platform, key_id: str) -> dict[str, int]:
    """The key's budget counters today: spent and held, in nano-USD."""
    day = int(time.time() // 86400)
    redis = redis_client(platform.redis_url)
    prefix = counters_prefix(key_id)
    return {kind: int(redis.get(f"{prefix}:{kind}:{day}") or 0) for kind in ("spent", "held")}


def queued(platform: Platform, key_id: str) -> int:
    """The key's count of queued jobs, as the admission script keeps it."""
    return int(redis_client(platform.redis_url).get(f"{counters_prefix(key_id)}:queued") or 0)


def reserved(platform: Platform, job_id: str) -> bool:
    return bool(redis_client(platform.redis_url).exists(reservation_key(job_id)))


def wait_until(check: Any, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"})


def post(http: httpx.Client, **body: Any) -> httpx.Response:
    body.setdefault("model", "parked")
    body.setdefault("prompt", "hello")
    return http.post("/v1/jobs", json=body)


def window_start() -> None:
    """Wait for the start of a window, so that the next second's requests share one."""
    time.sleep(WINDOW - time.time() % WINDOW + 0.05)


def assert_refused(response: httpx.Response, type_: str, retry_at_most: float) -> int:
    assert response.status_code == 429, response.text
    assert response.json() == {
        "error": {"type": type_, "message": response.json()["error"]["message"]}
    }
    retry = int(response.headers["Retry-After"])
    assert 1 <= retry <= math.ceil(retry_at_most)
    return retry


def seconds_to_midnight() -> float:
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


def test_requests_per_minute_answers_429_then_recovers(
    platform: Platform, apis: LimitsApis
) -> None:
    key = new_key(platform, rate_limit_per_minute=2)
    with client(apis.urls[0], key) as http:
        window_start()
        assert [post(http).status_code for _ in range(2)] == [202, 202]
        refused = post(http)
        retry = assert_refused(refused, "rate_limited", WINDOW)
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-limit-requests"] == "2"
        time.sleep(retry)
        assert post(http).status_code == 202


def test_two_api_processes_share_the_counters(platform: Platform, apis: LimitsApis) -> None:
    key = new_key(platform, rate_limit_per_minute=3)
    first, second = client(apis.urls[0], key), client(apis.urls[1], key)
    with first, second:
        window_start()
        statuses = [post(http).status_code for http in (first, second, first, second)]
    assert statuses == [202, 202, 202, 429]


def test_concurrent_submits_share_round_trips_but_not_the_limit(
    platform: Platform, apis: LimitsApis
) -> None:
    """Concurrent admissions go out in shared pipelines; each script still runs atomically,
    and a Redis that lost its scripts loads the script again."""
    key = new_key(platform, rate_limit_per_minute=10)
    redis_client(platform.redis_url).script_flush()

    async def burst() -> list[int]:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=apis.urls[0], headers=headers, timeout=30) as http:
            body = {"model": "parked", "prompt": "hello"}
            answers = await asyncio.gather(*(http.post("/v1/jobs", json=body) for _ in range(30)))
        return sorted(answer.status_code for answer in answers)

    window_start()
    assert asyncio.run(burst()) == [202] * 10 + [429] * 20


def test_tokens_per_minute_reserves_estimate_and_capped_max_tokens(
    platform: Platform, apis: LimitsApis
) -> None:
    # 40 characters: an estimate of 10 input tokens; max_tokens 40 capped to parked's 16.
    key = new_key(platform, tokens_per_minute=100)
    with client(apis.urls[0], key) as http:
        window_start()
        remaining = [post(http, prompt="x" * 40, max_tokens=40) for _ in range(3)]
        assert [r.headers["x-ratelimit-remaining-tokens"] for r in remaining] == ["74", "48", "22"]
        refused = post(http, prompt="x" * 40, max_tokens=40)
        retry = assert_refused(refused, "rate_limited", WINDOW)
        assert refused.headers["x-ratelimit-remaining-tokens"] == "22"
        time.sleep(retry)
        assert post(http, prompt="x" * 40, max_tokens=40).status_code == 202


def test_a_request_too_large_for_the_tokens_limit_says_so(platform: Platform) -> None:
    key = new_key(platform, tokens_per_minute=10)
    with client(platform.api_url, key) as http:
        refused = post(http, prompt="x" * 40, max_tokens=16)
    assert_refused(refused, "rate_limited", 60)
    assert "lower max_tokens" in refused.json()["error"]["message"]


def test_a_job_gives_back_the_tokens_it_did_not_use(platform: Platform) -> None:
    """A queued job cancelled gives back all it reserved; one that ran, what it did not use."""
    limit = 100_000
    key = new_key(platform, tokens_per_minute=limit)
    with client(platform.api_url, key) as http:
        queued = post(http, prompt="x" * 40, max_tokens=16)  # 10 + 16
        assert queued.headers["x-ratelimit-remaining-tokens"] == str(limit - 26)
        http.post(f"/v1/jobs/{queued.json()['id']}/cancel").raise_for_status()
        ran = post(http, model="sim", prompt="x" * 40, max_tokens=200, seed=1)  # 10 + 200
        assert ran.headers["x-ratelimit-remaining-tokens"] == str(limit - 210)
        job = wait_for(http, ran.json()["id"])
        used = job["usage"]["input_tokens"] + job["usage"]["output_tokens"]
        assert used < 210
        after = post(http, prompt="x" * 40, max_tokens=16)
    # The count the job's end left, unless a new minute began meanwhile.
    assert after.headers["x-ratelimit-remaining-tokens"] in (
        str(limit - used - 26),
        str(limit - 26),
    )


def test_rate_limit_headers_on_every_submit_of_a_limited_key(platform: Platform) -> None:
    key = new_key(platform, rate_limit_per_minute=1000, tokens_per_minute=100_000)
    with client(platform.api_url, key) as http, platform.client() as unlimited:
        accepted = post(http)
        plain = post(unlimited)
    assert accepted.status_code == 202
    assert {h: accepted.headers.get(h) is not None for h in RATE_HEADERS} == dict.fromkeys(
        RATE_HEADERS, True
    )
    assert accepted.headers["x-ratelimit-limit-requests"] == "1000"
    assert accepted.headers["x-ratelimit-reset-requests"].endswith("s")
    assert not any(h in plain.headers for h in RATE_HEADERS)


def test_max_queued_answers_queue_full_until_a_job_leaves_the_queue(platform: Platform) -> None:
    key = new_key(platform, max_queued=2)
    with client(platform.api_url, key) as http:
        jobs = [post(http) for _ in range(2)]
        assert [r.status_code for r in jobs] == [202, 202]
        refused = post(http)
        retry = assert_refused(refused, "queue_full", 60)
        assert retry == 2
        http.post(f"/v1/jobs/{jobs[0].json()['id']}/cancel").raise_for_status()
        assert post(http).status_code == 202


def test_max_queued_counts_in_redis_until_claim_cancel_or_expiry(platform: Platform) -> None:
    """The count rises at submit and drops once as the job leaves `queued`, whichever way."""
    made = made_key(platform, max_queued=2)
    with client(platform.api_url, made["secret"]) as http:
        parked = post(http).json()["id"]
        late = post(http, deadline_seconds=1).json()["id"]
        assert queued(platform, made["id"]) == 2
        assert_refused(post(http), "queue_full", 60)
        assert queued(platform, made["id"]) == 2  # a refusal counts nothing
        assert wait_for(http, late)["status"] == "expired"
        wait_until(lambda: queued(platform, made["id"]) == 1, "expiry left the count")
        assert not reserved(platform, late)
        http.post(f"/v1/jobs/{parked}/cancel").raise_for_status()
        assert queued(platform, made["id"]) == 0
        http.post(f"/v1/jobs/{parked}/cancel").raise_for_status()  # settled once
        assert queued(platform, made["id"]) == 0
        ran = post(http, model="sim", max_tokens=4, seed=1).json()["id"]
        assert wait_for(http, ran)["status"] == "succeeded"
    assert queued(platform, made["id"]) == 0
    assert not reserved(platform, ran)


def test_a_running_job_leaves_its_keys_queue(platform: Platform, apis: LimitsApis) -> None:
    made = made_key(platform, max_queued=1)
    with client(apis.urls[0], made["secret"]) as http:
        running = post(http, model="pricey", max_tokens=400).json()["id"]
        wait_until(
            lambda: http.get(f"/v1/jobs/{running}").json()["status"] == "running", "never ran"
        )
        # With the stream's `status: running` event, a moment after the claim that a poll
        # shows as `running`.
        wait_until(lambda: queued(platform, made["id"]) == 0, "the running job still counted")
        assert post(http, model="pricey-parked").status_code == 202
        assert queued(platform, made["id"]) == 1
        http.post(f"/v1/jobs/{running}/cancel").raise_for_status()
        assert wait_for(http, running)["status"] == "cancelled"
    assert queued(platform, made["id"]) == 1  # its end does not count it out twice


def test_a_job_failed_after_its_last_attempt_settles(platform: Platform, apis: LimitsApis) -> None:
    """A job whose workers kept dying gives back its reservation when the sweeper fails it."""
    made = made_key(platform, daily_budget_usd=10, max_queued=5)
    with client(apis.urls[0], made["secret"]) as http:
        job_id = post(http, model="pricey-parked").json()["id"]
        assert counters(platform, made["id"])["held"] > 0
        engine = make_sync_engine(platform.database_url, pool_size=1)
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                for attempt in (1, 2, 3):  # each lease lapses at once: a worker that died
                    wait_until(
                        lambda: (
                            lifecycle.claim(conn, uuid.UUID(job_id), "gone", 0.01, 3) is not None
                        ),
                        f"attempt {attempt} never claimed",
                    )
        finally:
            engine.dispose()
        job = wait_for(http, job_id)
    assert job["status"] == "failed"
    assert counters(platform, made["id"]) == {"spent": 0, "held": 0}
    assert queued(platform, made["id"]) == 0
    assert not reserved(platform, job_id)


def test_budget_counts_held_cost_until_the_job_settles(
    platform: Platform, apis: LimitsApis
) -> None:
    # A queued job of pricey-parked holds 16 tokens * 100 USD/Mtok = 0.0016 USD.
    key = new_key(platform, daily_budget_usd=0.001)
    with client(apis.urls[0], key) as http:
        held = post(http, model="pricey-parked")
        assert held.status_code == 202
        refused = post(http, model="pricey-parked")
        retry = assert_refused(refused, "budget_exceeded", seconds_to_midnight() + 2)
        assert retry >= seconds_to_midnight() - 5
        http.post(f"/v1/jobs/{held.json()['id']}/cancel").raise_for_status()
        assert post(http, model="pricey-parked").status_code == 202


def test_budget_counts_the_cost_of_a_cancelled_job(platform: Platform, apis: LimitsApis) -> None:
    # One output token of `pricey` costs 0.0001 USD: the whole budget.
    made = made_key(platform, daily_budget_usd=0.0001)
    with client(apis.urls[0], made["secret"]) as http:
        job_id = post(http, model="pricey", max_tokens=400).json()["id"]
        deadline = time.monotonic() + 30
        while not http.get(f"/v1/jobs/{job_id}").json()["usage"]["output_tokens"]:
            assert time.monotonic() < deadline, "the job never produced a token"
            time.sleep(0.05)
        http.post(f"/v1/jobs/{job_id}/cancel")
        job = wait_for(http, job_id)
        assert job["status"] == "cancelled"
        assert job["usage"]["cost_usd"], "a cancelled job records its cost"
        refused = post(http, model="pricey-parked")
    assert_refused(refused, "budget_exceeded", seconds_to_midnight() + 2)
    # Refused for what the job spent: its reservation (0.04 USD) was given back.
    spent = math.ceil(round(job["usage"]["cost_usd"] * 1e9, 3))
    assert counters(platform, made["id"]) == {"spent": spent, "held": 0}


def test_openai_route_answers_429_in_openais_shape(platform: Platform) -> None:
    key = new_key(platform, rate_limit_per_minute=1)
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with client(platform.api_url, key) as http:
        answers = [http.post("/v1/chat/completions", json=body) for _ in range(3)]
    refused = next(r for r in answers if r.status_code == 429)
    assert answers[0].status_code == 200 or answers[1].status_code == 200
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limited"
    assert set(error) == {"message", "type", "param", "code"}
