"""Feedback on jobs' answers: POST /v1/jobs/{id}/feedback, and the job's JSON carrying it."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Platform, submit, wait_for


def _ended(http: httpx.Client, **body: Any) -> dict[str, Any]:
    job = wait_for(http, submit(http, prompt="Rate me", max_tokens=8, **body)["id"])
    assert job["status"] == "succeeded", job
    return job


def _rate(http: httpx.Client, job_id: str, **body: Any) -> httpx.Response:
    return http.post(f"/v1/jobs/{job_id}/feedback", json=body)


def _stored(platform: Platform, job_id: str) -> list[tuple[int, str | None]]:
    with psycopg.connect(platform.database_url) as db:
        rows = db.execute(
            "SELECT rating, comment FROM feedback WHERE job_id = %s", (job_id,)
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def test_feedback_is_stored_and_shown_on_the_job(platform: Platform, http: httpx.Client) -> None:
    job = _ended(http)
    assert job["feedback"] is None and job["evaluation"] is None
    response = _rate(http, job["id"], rating=1, comment="clear and right")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["job_id"] == job["id"]
    assert (body["rating"], body["comment"]) == (1, "clear and right")
    assert body["created_at"]
    shown = http.get(f"/v1/jobs/{job['id']}").json()
    assert shown["feedback"] == {"rating": 1, "comment": "clear and right"}
    listed = {j["id"]: j for j in http.get("/v1/jobs", params={"limit": 100}).json()["data"]}
    assert listed[job["id"]]["feedback"] == {"rating": 1, "comment": "clear and right"}


def test_the_latest_rating_from_a_key_wins(platform: Platform, http: httpx.Client) -> None:
    job = _ended(http)
    assert _rate(http, job["id"], rating=1).status_code == 201
    assert _rate(http, job["id"], rating=-1, comment="on second thought").status_code == 201
    # The bootstrap key has no row (api_key_id null): still one rating, replaced.
    assert _stored(platform, job["id"]) == [(-1, "on second thought")]
    shown = http.get(f"/v1/jobs/{job['id']}").json()["feedback"]
    assert shown == {"rating": -1, "comment": "on second thought"}


def test_each_key_sees_its_own_rating(platform: Platform) -> None:
    tenant = f"fb-{uuid.uuid4().hex[:8]}"
    first, second = platform.new_key(tenant), platform.new_key(tenant)
    with platform.client(first) as a, platform.client(second) as b:
        job = _ended(a)
        assert _rate(a, job["id"], rating=1).status_code == 201
        assert _rate(b, job["id"], rating=-1, comment="no").status_code == 201
        assert a.get(f"/v1/jobs/{job['id']}").json()["feedback"]["rating"] == 1
        assert b.get(f"/v1/jobs/{job['id']}").json()["feedback"]["rating"] == -1
    assert sorted(_stored(platform, job["id"])) == [(-1, "no"), (1, None)]


def test_another_tenants_job_is_not_found(platform: Platform, http: httpx.Client) -> None:
    job = _ended(http)
    with platform.client(platform.new_key(f"other-{uuid.uuid4().hex[:8]}")) as other:
        response = _rate(other, job["id"], rating=1)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
    assert _stored(platform, job["id"]) == []
    assert _rate(http, str(uuid.uuid4()), rating=1).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"rating": 0},
        {"rating": 2},
        {"rating": True},
        {"rating": 1.0},
        {"rating": "1"},
        {},
        {"rating": 1, "stars": 5},
        {"rating": 1, "comment": "x" * 2001},
        {"rating": 1, "comment": "nul \u0000"},
    ],
)
def test_bad_feedback_is_a_422(http: httpx.Client, body: dict[str, Any]) -> None:
    job = _ended(http)
    response = _rate(http, job["id"], **body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"]


def test_a_body_over_the_size_limit_is_a_documented_413(
    platform: Platform, http: httpx.Client
) -> None:
    job = _ended(http)
    response = _rate(http, job["id"], rating=1, comment="x" * (5 * 1024 * 1024))
    assert response.status_code == 413, response.text
    assert response.json()["error"]["type"]
    spec = httpx.get(f"{platform.api_url}/openapi.json", timeout=10).json()
    assert "413" in spec["paths"]["/v1/jobs/{job_id}/feedback"]["post"]["responses"]


def test_a_job_not_ended_cannot_be_rated(http: httpx.Client) -> None:
    job = submit(http, model="slow", prompt="a long answer", max_tokens=400)
    response = _rate(http, job["id"], rating=1)
    assert response.status_code == 409, response.text
    assert "once it has ended" in response.json()["error"]["message"]
    http.post(f"/v1/jobs/{job['id']}/cancel")
    assert _rate(http, wait_for(http, job["id"])["id"], rating=-1).status_code == 201


def test_feedback_is_counted_by_model_and_rating(platform: Platform, http: httpx.Client) -> None:
    job = _ended(http)
    assert _rate(http, job["id"], rating=-1).status_code == 201
    metrics = httpx.get(f"{platform.api_url}/metrics", timeout=10).text
    assert 'inferq_feedback_total{model="sim",rating="down"}' in metrics
