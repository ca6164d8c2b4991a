"""Retention and redaction: old jobs lose their texts and keep their figures; with
INFERQ_REDACT_INPUTS a job's input goes as it ends."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from inferq.settings import Settings
from tests.conftest import Platform, submit, wait_for
from tests.servers import free_port, wait_http
from workers import retention
from workers.context import WorkerContext

FIGURES = (
    "status, input_tokens, output_tokens, cost_usd, finish_reason, created_at, started_at,"
    " first_token_at, finished_at, attempts"
)


@pytest.fixture
def ctx(platform: Platform) -> Iterator[WorkerContext]:
    """beat's retention pass, run here on the platform's database."""
    settings = Settings(
        environment="test",
        database_url=platform.database_url,
        redis_url=platform.redis_url,
        models_file=platform.env["INFERQ_MODELS_FILE"],
    )
    context = WorkerContext.create(settings, threads=2)
    yield context
    context.close()


def _row(platform: Platform, job_id: str, columns: str) -> tuple[Any, ...]:
    with psycopg.connect(platform.database_url) as db:
        row = db.execute(f"SELECT {columns} FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return tuple(row)


def _age(platform: Platform, job_ids: list[str], days: int = 31) -> None:
    """Move the jobs back in time, every timestamp alike (their timings stay)."""
    shift = f"interval '{days} days'"
    with psycopg.connect(platform.database_url) as db:
        db.execute(
            f"UPDATE jobs SET created_at = created_at - {shift}, started_at = started_at - {shift},"
            f" first_token_at = first_token_at - {shift}, finished_at = finished_at - {shift}"
            " WHERE id = ANY(%s::uuid[])",
            (job_ids,),
        )


def _ended(http: httpx.Client, **body: Any) -> dict[str, Any]:
    job = wait_for(http, submit(http, max_tokens=12, **body)["id"])
    assert job["status"] == "succeeded", job
    return job


def test_retention_clears_texts_and_keeps_figures(
    platform: Platform, http: httpx.Client, ctx: WorkerContext
) -> None:
    old = _ended(http, prompt="An old secret")
    chat = _ended(http, messages=[{"role": "user", "content": "An old chat"}])
    recent = _ended(http, prompt="A recent one")
    _age(platform, [old["id"], chat["id"]])
    before = {j: _row(platform, j, FIGURES) for j in (old["id"], chat["id"])}
    aged = http.get(f"/v1/jobs/{old['id']}").json()

    assert retention.clear_old(ctx) >= 2

    for job_id in (old["id"], chat["id"]):
        assert _row(platform, job_id, "input, output") == ({}, None)
        assert _row(platform, job_id, "redacted_at")[0] is not None
        assert _row(platform, job_id, FIGURES) == before[job_id]
    shown = http.get(f"/v1/jobs/{old['id']}").json()
    assert shown["output"] is None and shown["redacted_at"] is not None
    assert shown["usage"] == aged["usage"] and shown["timings"] == aged["timings"]
    assert shown["status"] == "succeeded"
    events = http.get(f"/v1/jobs/{old['id']}/events", params={"after": "0-0"})
    assert events.status_code == 200
    kept = _row(platform, recent["id"], "input, output, redacted_at")
    assert kept == ({"prompt": "A recent one"}, recent["output"], None)


def test_retention_works_in_bounded_pages(
    platform: Platform, http: httpx.Client, ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [_ended(http, prompt=f"paged {i}")["id"] for i in range(3)]
    _age(platform, jobs)
    monkeypatch.setattr(retention, "PAGE", 2)
    monkeypatch.setattr(retention, "MAX_PAGES", 1)
    assert retention.clear_old(ctx) == 2
    assert retention.clear_old(ctx) == 1
    assert retention.clear_old(ctx) == 0
    for job_id in jobs:
        assert _row(platform, job_id, "input, output") == ({}, None)


@pytest.fixture(scope="module")
def redacting(platform: Platform) -> Iterator[httpx.Client]:
    """An API with INFERQ_REDACT_INPUTS on, beside the platform's (same worker)."""
    port = free_port()
    api = platform.spawn(
        "api", "--port", str(port), name="api-redacting", INFERQ_REDACT_INPUTS="true"
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", api)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            client.headers.update(platform.client().headers)
            yield client
    finally:
        api.stop()


def test_redacted_input_is_cleared_as_the_job_ends(
    platform: Platform, redacting: httpx.Client
) -> None:
    job = _ended(redacting, prompt="My card number is 4111")
    stored = _row(platform, job["id"], "input, output, redacted_at, input_tokens")
    assert stored[0] == {} and stored[2] is not None
    assert stored[1] == job["output"] and stored[3] == 5
    shown = redacting.get(f"/v1/jobs/{job['id']}").json()
    assert shown["output"] == job["output"] and shown["redacted_at"] is not None


def test_a_redacted_cache_hit_keeps_no_input(platform: Platform, redacting: httpx.Client) -> None:
    first = _ended(redacting, prompt="Cache me, forget me", seed=5)
    hit = submit(redacting, prompt="Cache me, forget me", seed=5, max_tokens=12)
    assert hit["cached"] is True and hit["output"] == first["output"]
    assert _row(platform, hit["id"], "input")[0] == {}
    assert hit["redacted_at"] is not None


def test_a_cancelled_queued_job_is_redacted_too(
    platform: Platform, redacting: httpx.Client
) -> None:
    # `parked` is served by no worker: the job stays queued until cancelled.
    job = submit(redacting, model="parked", prompt="never run me", max_tokens=4)
    cancelled = redacting.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert _row(platform, job["id"], "input")[0] == {}


def test_without_redaction_the_input_stays(platform: Platform, http: httpx.Client) -> None:
    job = _ended(http, prompt="Keep me")
    assert _row(platform, job["id"], "input, redacted_at") == ({"prompt": "Keep me"}, None)
