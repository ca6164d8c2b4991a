"""Tenants side by side: one tenant's bad input fails no one else, admin keys stay in their
tenant, keys are listed, changed and revoked (over HTTP and from the command line)."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
import pytest

from api.jobs.batcher import SubmitBatcher
from inferq.db import make_async_engine, uuid7
from inferq.models import Job
from tests.conftest import Platform
from tests.servers import free_port, wait_http

GOOD_SUBMITS = 150


def _raw(body: dict[str, Any]) -> bytes:
    """JSON as a careless client writes it: NaN and Infinity bare, \\u escapes kept."""
    return json.dumps(body, allow_nan=True, ensure_ascii=True).encode()


def _bad_bodies(marker: str) -> list[bytes]:
    """Requests Postgres would refuse to store, each carrying `marker` in its text."""
    text = f"bad-{marker}"
    return [
        _raw({"model": "sim", "prompt": f"{text} nul \u0000 here"}),
        _raw({"model": "sim", "prompt": f"{text} lone \ud800 surrogate"}),
        _raw({"model": "sim", "messages": [{"role": "user", "content": f"{text}\u0000"}]}),
        _raw({"model": "sim", "messages": [{"role": "user", "content": f"{text}\udc00"}]}),
        _raw({"model": "sim", "prompt": text, "stop": ["\u0000"]}),
        _raw({"model": "sim", "prompt": text, "metadata": {"score": float("nan")}}),
        _raw({"model": "sim", "prompt": text, "metadata": {"a": [{"b": float("inf")}]}}),
        _raw({"model": "sim", "prompt": text, "metadata": {"a": {"b": ["x\u0000"]}}}),
        _raw({"model": "sim", "prompt": text, "metadata": {"k\ud800": 1}}),
        _raw({"model": "sim", "prompt": text, "metadata": {"n": float("-inf")}}),
    ]


async def _post(http: httpx.AsyncClient, key: str, path: str, body: bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return await http.post(path, content=body, headers=headers)


async def test_bad_input_of_one_tenant_fails_none_of_another_tenants_submits(
    platform: Platform,
) -> None:
    marker = uuid.uuid4().hex
    bad_key, good_key = (
        platform.new_key(f"bad-{marker[:6]}"),
        platform.new_key(f"good-{marker[:6]}"),
    )
    bad = _bad_bodies(marker)
    good = [
        _raw({"model": "sim", "prompt": f"good-{marker} {i}", "max_tokens": 1})
        for i in range(GOOD_SUBMITS)
    ]
    calls = []
    for i, body in enumerate(good):
        calls.append(("good", body))
        if i % (GOOD_SUBMITS // len(bad)) == 0 and bad:
            calls.append(("bad", bad.pop()))
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=platform.api_url, timeout=60, limits=limits) as http:
        for key in (bad_key, good_key):  # both keys known to the API: no lookup to wait for
            assert (
                await http.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
            ).is_success
        answers = await asyncio.gather(
            *(
                _post(http, good_key if kind == "good" else bad_key, "/v1/jobs", body)
                for kind, body in calls
            )
        )
    good_statuses = [a.status_code for (k, _), a in zip(calls, answers, strict=True) if k == "good"]
    bad_answers = [a for (k, _), a in zip(calls, answers, strict=True) if k == "bad"]
    assert good_statuses == [202] * GOOD_SUBMITS, collections.Counter(good_statuses)
    assert [a.status_code for a in bad_answers] == [422] * len(bad_answers), [
        a.text for a in bad_answers
    ]
    assert all(a.json()["error"]["type"] == "invalid_request" for a in bad_answers)
    assert marker not in (platform.logs / "api.log").read_text(errors="replace")


# Each body with the field its error must name.
UNSTORABLE_JOBS = [
    pytest.param({"prompt": "a\u0000b"}, "prompt", id="nul-prompt"),
    pytest.param({"prompt": "a\ud800b"}, "prompt", id="surrogate-prompt"),
    pytest.param(
        {"messages": [{"role": "user", "content": "\udfff"}]}, "messages.0.content", id="message"
    ),
    pytest.param({"prompt": "x", "stop": ["ok", "\u0000"]}, "stop.1", id="stop"),
    pytest.param({"prompt": "x", "temperature": float("nan")}, "temperature", id="nan-param"),
    pytest.param({"prompt": "x", "deadline_seconds": float("inf")}, "deadline_seconds", id="inf"),
    pytest.param(
        {"prompt": "x", "metadata": {"a": {"b": [1, float("nan")]}}},
        "metadata.a.b[1]",
        id="nan-metadata",
    ),
    pytest.param({"prompt": "x", "metadata": {"a\u0000": 1}}, "key of metadata", id="nul-key"),
    pytest.param({"prompt": "x", "\ud800": 1}, "unicode", id="surrogate-field-name"),
]


@pytest.mark.parametrize(("fields", "named"), UNSTORABLE_JOBS)
def test_input_postgres_cannot_store_is_a_422_naming_the_field(
    platform: Platform, fields: dict[str, Any], named: str
) -> None:
    with platform.client() as http:
        answer = http.post(
            "/v1/jobs",
            content=_raw({"model": "sim", **fields}),
            headers={"Content-Type": "application/json"},
        )
    assert answer.status_code == 422, answer.text
    assert named in answer.json()["error"]["message"]


UNSTORABLE_OPENAI = [
    pytest.param("/v1/completions", {"prompt": "a\u0000"}, "prompt", id="completion-prompt"),
    pytest.param("/v1/completions", {"prompt": ["a\ud800"]}, "prompt", id="completion-list"),
    pytest.param("/v1/chat/completions", {"user": "\u0000"}, "user", id="user"),
    pytest.param(
        "/v1/chat/completions", {"metadata": {"k": "\ud800"}}, "metadata.k", id="metadata"
    ),
    pytest.param("/v1/chat/completions", {"stop": "\u0000"}, "stop", id="stop"),
    pytest.param("/v1/chat/completions", {"temperature": float("-inf")}, "temperature", id="inf"),
    pytest.param(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "\u0000"}]},
        "messages.0.content",
        id="message",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
        "messages.0.content",
        id="message-part",
    ),
]


@pytest.mark.parametrize(("path", "fields", "named"), UNSTORABLE_OPENAI)
def test_openai_input_postgres_cannot_store_is_refused_naming_the_param(
    platform: Platform, path: str, fields: dict[str, Any], named: str
) -> None:
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    if path == "/v1/completions":
        body = {"model": "sim", "prompt": "hi", "max_tokens": 1}
    with platform.client() as http:
        answer = http.post(
            path, content=_raw(body | fields), headers={"Content-Type": "application/json"}
        )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert named in f"{error['param']} {error['message']}"


def _job_row(prompt: str) -> dict[str, Any]:
    """A job's columns as the submit path makes them (tenant "batcher", no key)."""
    return {
        "id": uuid7(),
        "tenant": "batcher",
        "api_key_id": None,
        "requested_model": "sim",
        "model": "sim",
        "status": "queued",
        "priority": "batch",
        "input": {"prompt": prompt},
        "params": {"max_tokens": 1},
        "webhook": None,
        "metadata_": {},
        "deadline_at": None,
        "request_hash": None,
    }


async def test_batcher_fails_only_the_rows_postgres_refuses(platform: Platform) -> None:
    # Past the request models (which refuse such input): the batcher's own defence.
    rows = [_job_row(f"fine {i}") for i in range(60)]
    rows[3]["input"] = {"prompt": "nul \u0000"}
    rows[30]["metadata_"] = {"x": float("nan")}
    rows[59]["input"] = {"prompt": "lone \ud800"}
    refused = {3, 30, 59}
    engine = make_async_engine(platform.database_url, pool_size=2)
    enqueued: list[Job] = []

    async def enqueue(jobs: list[Job]) -> None:
        enqueued.extend(jobs)

    batcher = SubmitBatcher(engine.execution_options(isolation_level="AUTOCOMMIT"), enqueue)
    batcher.start()
    try:
        outcomes = await asyncio.gather(
            *(batcher.submit(row) for row in rows), return_exceptions=True
        )
    finally:
        await batcher.close()
        await engine.dispose()
    failed = {i for i, outcome in enumerate(outcomes) if isinstance(outcome, BaseException)}
    assert failed == refused
    assert sorted(job.id for job in enqueued) == sorted(
        row["id"] for i, row in enumerate(rows) if i not in refused
    )


# --- admin keys: scoping and management ------------------------------------------------------


def _admin(platform: Platform, tenant: str) -> httpx.Client:
    return platform.client(platform.new_key(tenant, admin=True))


def _key_ids(http: httpx.Client, **params: Any) -> list[str]:
    """Every key the caller lists, following the cursor."""
    ids: list[str] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        page = http.get("/v1/admin/keys", params=query)
        assert page.status_code == 200, page.text
        body = page.json()
        assert all("secret" not in key and "secret_sha256" not in key for key in body["data"])
        ids += [key["id"] for key in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return ids


def test_an_admin_key_manages_its_own_tenant_only(platform: Platform, http: httpx.Client) -> None:
    run = uuid.uuid4().hex[:8]
    ours, theirs = f"ours-{run}", f"theirs-{run}"
    admin = _admin(platform, ours)
    made = admin.post("/v1/admin/keys", json={"name": "worker", "rate_limit_per_minute": 5})
    assert made.status_code == 201, made.text
    assert made.json()["tenant"] == ours  # no tenant given: the admin's own
    other = http.post("/v1/admin/keys", json={"name": "x", "tenant": theirs}).json()

    refused = admin.post("/v1/admin/keys", json={"name": "spy", "tenant": theirs})
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["type"] == "permission_denied"
    assert admin.post("/v1/admin/keys", json={"name": "ok", "tenant": ours}).status_code == 201
    assert admin.get("/v1/admin/keys", params={"tenant": theirs}).status_code == 403

    listed = admin.get("/v1/admin/keys", params={"limit": 100}).json()["data"]
    assert {key["tenant"] for key in listed} == {ours}
    assert len(listed) == 3  # the admin key itself, "worker" and "ok"
    assert other["id"] not in _key_ids(admin, limit=1)
    for call in (
        admin.patch(f"/v1/admin/keys/{other['id']}", json={"name": "mine now"}),
        admin.delete(f"/v1/admin/keys/{other['id']}"),
    ):
        assert call.status_code == 404, call.text
    assert platform.client(other["secret"]).get("/v1/jobs").status_code == 200

    # The bootstrap key manages every tenant.
    everyone = _key_ids(http, limit=7)
    assert other["id"] in everyone and made.json()["id"] in everyone
    assert _key_ids(http, tenant=theirs) == [other["id"]]
    renamed = http.patch(f"/v1/admin/keys/{made.json()['id']}", json={"name": "renamed"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "renamed"
    assert http.delete(f"/v1/admin/keys/{other['id']}").status_code == 200


def test_keys_are_listed_changed_and_revoked(platform: Platform, http: httpx.Client) -> None:
    tenant = f"managed-{uuid.uuid4().hex[:8]}"
    limits = {"rate_limit_per_minute": 60, "tokens_per_minute": 5000, "daily_budget_usd": 2.5}
    made = http.post("/v1/admin/keys", json={"name": "svc", "tenant": tenant, **limits})
    assert made.status_code == 201, made.text
    key = made.json()
    assert key | limits == key and key["max_queued"] is None
    for body in ({"name": "x", "colour": "red"}, {"name": "x", "rate_limit_per_minute": 0}):
        assert http.post("/v1/admin/keys", json=body).status_code == 422
    for body in ({"tenant": "elsewhere"}, {"admin": True}, {"name": None}, {"max_queued": -1}):
        answer = http.patch(f"/v1/admin/keys/{key['id']}", json=body)
        assert answer.status_code == 422, answer.text

    changed = http.patch(
        f"/v1/admin/keys/{key['id']}",
        json={"name": "svc-2", "max_queued": 10, "rate_limit_per_minute": None},
    )
    assert changed.status_code == 200, changed.text
    assert (
        changed.json()
        | {
            "name": "svc-2",
            "max_queued": 10,
            "rate_limit_per_minute": None,
            "tokens_per_minute": 5000,  # not sent: unchanged
            "daily_budget_usd": 2.5,
        }
        == changed.json()
    )
    (listed,) = http.get("/v1/admin/keys", params={"tenant": tenant}).json()["data"]
    assert listed == changed.json()
    assert set(listed) == {
        "id", "name", "prefix", "tenant", "admin", "rate_limit_per_minute",
        "tokens_per_minute", "daily_budget_usd", "max_queued", "created_at", "revoked_at",
    }  # fmt: skip

    revoked = http.delete(f"/v1/admin/keys/{key['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    again = http.delete(f"/v1/admin/keys/{key['id']}")
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert http.delete(f"/v1/admin/keys/{uuid.uuid4()}").status_code == 404
    assert http.get("/v1/admin/keys", params={"cursor": str(uuid.uuid4())}).status_code == 422


def _refused_everywhere(clients: list[httpx.Client], seconds: float) -> float:
    """Seconds until every client's key is refused (401); fails after `seconds`."""
    start = time.monotonic()
    waiting = list(clients)
    while waiting:
        waiting = [c for c in waiting if c.get("/v1/jobs").status_code == 200]
        elapsed = time.monotonic() - start
        assert elapsed < seconds, f"a revoked key still works on {len(waiting)} API process(es)"
        time.sleep(0.1)
    return time.monotonic() - start


def test_a_revoked_key_is_refused_by_every_api_process(
    platform: Platform, http: httpx.Client
) -> None:
    port = free_port()
    second = platform.spawn("api", "--port", str(port), name="api-2")
    wait_http(f"http://127.0.0.1:{port}/readyz", second)
    made = http.post("/v1/admin/keys", json={"name": "leaving", "tenant": "leaving"}).json()
    headers = {"Authorization": f"Bearer {made['secret']}"}
    one = httpx.Client(base_url=platform.api_url, headers=headers, timeout=30)
    two = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30)
    try:
        # Both processes now hold the key in their caches.
        assert one.get("/v1/jobs").status_code == two.get("/v1/jobs").status_code == 200
        revoke = platform.client().delete  # through the first process
        assert revoke(f"/v1/admin/keys/{made['id']}").status_code == 200
        assert one.get("/v1/jobs").status_code == 401  # the revoking process forgets at once
        # The design's 5 s, with room for a loaded machine.
        _refused_everywhere([one, two], seconds=8.0)
    finally:
        one.close()
        two.close()
        second.stop()
        platform.processes.remove(second)


def _inferq(platform: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferq", *args],
        env=platform.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_commands_list_update_and_revoke(platform: Platform) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    made = _inferq(platform, "keys", "create", "batchy", "--tenant", tenant, "--max-queued", "3")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert platform.client(secret).get("/v1/jobs").status_code == 200

    listed = _inferq(platform, "keys", "list", "--tenant", tenant)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.strip().splitlines()
    assert header.split()[:3] == ["ID", "NAME", "TENANT"]
    assert "batchy" in row and tenant in row and secret not in listed.stdout
    key_id = row.split()[0]

    updated = _inferq(
        platform, "keys", "update", key_id, "--name", "batchier",
        "--daily-budget-usd", "1.25", "--max-queued", "none",
    )  # fmt: skip
    assert updated.returncode == 0, updated.stderr
    (key,) = platform.client().get("/v1/admin/keys", params={"tenant": tenant}).json()["data"]
    assert (key["name"], key["daily_budget_usd"], key["max_queued"]) == ("batchier", 1.25, None)

    for args in (
        ("update", key_id),  # nothing to change
        ("update", key_id, "--max-queued", "lots"),
        ("update", str(uuid.uuid4()), "--name", "ghost"),
        ("revoke", str(uuid.uuid4())),
        ("revoke", "not-a-uuid"),
    ):
        failed = _inferq(platform, "keys", *args)
        assert failed.returncode != 0, args
        assert "Traceback" not in failed.stderr, failed.stderr
        assert failed.stderr.strip(), args

    revoked = _inferq(platform, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert _inferq(platform, "keys", "revoke", key_id).returncode == 0  # idempotent
    _refused_everywhere([platform.client(secret)], seconds=8.0)
