"""The API under faults: dependencies down, bursts of cold keys, hostile input, SDK retries."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import psycopg
import pytest
from openai import OpenAI

from api.main import MAX_BODY_BYTES
from api.openai.schemas import ChatCompletionRequest
from api.openai.service import request_digest
from inferq.processes import Child, wait_http
from tests.conftest import BOOTSTRAP_KEY, Platform
from tests.servers import free_port

HELLO = [{"role": "user", "content": "Tell me about queues"}]
AUTH = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}


def _envelope(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert isinstance(error["type"], str)
    assert isinstance(error["message"], str)
    return dict(error)


def _unavailable(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    return _envelope(response)


# --- a burst of submits from keys on their first use ---------------------------------------


async def _submit_all(platform: Platform, keys: list[str], per_key: int) -> list[int]:
    limits = httpx.Limits(max_connections=len(keys) * per_key)
    async with httpx.AsyncClient(base_url=platform.api_url, timeout=120, limits=limits) as http:

        async def one(key: str, i: int) -> int:
            response = await http.post(
                "/v1/jobs",
                json={"model": "sim", "prompt": f"cold {i}", "max_tokens": 1},
                headers={"Authorization": f"Bearer {key}"},
            )
            return response.status_code

        calls = [one(key, i) for key in keys for i in range(per_key)]
        return list(await asyncio.gather(*calls))


async def test_burst_of_submits_from_cold_keys_is_all_accepted(platform: Platform) -> None:
    """Each request once held its key lookup's connection while waiting for the batched
    insert, which needs a connection too: 200 at once exhausted the pool (500s after 30 s)."""
    keys = [platform.new_key(f"cold-{uuid.uuid4().hex[:8]}") for _ in range(8)]
    statuses = await _submit_all(platform, keys, per_key=25)
    assert len(statuses) == 200
    assert statuses.count(202) == 200, sorted(set(statuses))


# --- a dependency that is down --------------------------------------------------------------


def _spawn_api(platform: Platform, name: str, **env: str) -> tuple[Child, str]:
    port = free_port()
    child = platform.spawn("api", "--port", str(port), name=name, **env)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", child)
    return child, url


@pytest.fixture(scope="module")
def no_postgres(platform: Platform) -> Iterator[str]:
    closed = free_port()
    child, url = _spawn_api(
        platform,
        "api-no-postgres",
        INFERQ_DATABASE_URL=f"postgresql://inferq:hunter2@127.0.0.1:{closed}/inferq",
    )
    yield url
    child.stop()


def test_postgres_down_is_a_503_on_the_jobs_routes(platform: Platform, no_postgres: str) -> None:
    cold = platform.new_key(f"pg-down-{uuid.uuid4().hex[:8]}")  # made on the healthy API
    with httpx.Client(base_url=no_postgres, timeout=30) as http:
        submitted = http.post("/v1/jobs", json={"model": "sim", "prompt": "hi"}, headers=AUTH)
        error = _unavailable(submitted)
        assert error["type"] == "service_unavailable"
        assert "database" in error["message"]
        _unavailable(http.get(f"/v1/jobs/{uuid.uuid4()}", headers=AUTH))
        _unavailable(http.get("/v1/jobs", headers=AUTH))
        # A key that is not the bootstrap key needs the database to be looked up.
        lookup = http.get("/v1/jobs", headers={"Authorization": f"Bearer {cold}"})
        _unavailable(lookup)
        for response in (submitted, lookup):
            assert "hunter2" not in response.text
            assert "127.0.0.1" not in response.text


def test_postgres_down_is_a_503_in_openais_shape(no_postgres: str) -> None:
    response = httpx.post(
        f"{no_postgres}/v1/chat/completions",
        json={"model": "sim", "messages": HELLO},
        headers=AUTH,
        timeout=30,
    )
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    assert error["code"] == "service_unavailable"


def test_readyz_names_postgres_as_down_without_its_address(no_postgres: str) -> None:
    response = httpx.get(f"{no_postgres}/readyz", timeout=30)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    body = response.json()
    assert body["checks"]["postgres"] == "down"
    assert body["checks"]["redis"] == "ok"
    assert body["down"] == ["postgres"]
    assert "postgres" in body["error"]["message"]
    assert "hunter2" not in response.text
    assert "127.0.0.1" not in response.text


@pytest.fixture(scope="module")
def no_redis(platform: Platform) -> Iterator[str]:
    closed = free_port()
    redis_url = f"redis://127.0.0.1:{closed}/0"
    child, url = _spawn_api(
        platform, "api-no-redis", INFERQ_REDIS_URL=redis_url, INFERQ_BROKER_URL=redis_url
    )
    yield url
    child.stop()


def test_redis_down_is_a_503_where_redis_is_needed(platform: Platform, no_redis: str) -> None:
    with httpx.Client(base_url=no_redis, timeout=60) as http:
        # A model no worker serves: the job stays queued, so that it can be cancelled.
        job = http.post("/v1/jobs", json={"model": "parked", "prompt": "hi"}, headers=AUTH)
        # The row is committed: the sweeper hands it to the broker once Redis is back.
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        events = http.get(f"/v1/jobs/{job_id}/events", headers=AUTH)
        assert "redis" in _unavailable(events)["message"].lower()
        _unavailable(http.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH))
        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"] == "down"
        assert "redis" in ready.json()["down"]
    with platform.client() as healthy:
        assert healthy.post(f"/v1/jobs/{job_id}/cancel").status_code == 200


# --- input that used to get through ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("body", [b"{not json", b"", b'{"model": "sim", "messages": [}'])
def test_a_body_that_is_not_json_is_a_400_in_openais_shape(
    platform: Platform, path: str, body: bytes
) -> None:
    response = httpx.post(f"{platform.api_url}{path}", content=body, headers=JSON)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_json"
    assert error["message"].startswith("the body is not valid JSON: ")
    assert " at line 1 column " in error["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/jobs"])
def test_a_body_that_is_not_utf8_is_refused_in_words(platform: Platform, path: str) -> None:
    body = b'{"model": "sim", "prompt": "caf\xe9"}'
    response = httpx.post(f"{platform.api_url}{path}", content=body, headers=JSON)
    assert response.status_code in (400, 422), response.text
    assert "not UTF-8" in _envelope(response)["message"]


def test_a_jobs_body_that_is_not_json_says_where(platform: Platform) -> None:
    response = httpx.post(f"{platform.api_url}/v1/jobs", content=b'{"model": }', headers=JSON)
    assert response.status_code == 422
    error = _envelope(response)
    assert error["type"] == "invalid_request"
    assert error["message"] == (
        "the body is not valid JSON: Expecting value at line 1 column 11 (char 10)"
    )


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    yield b'{"model": "sim", "prompt": "'
    sent = 0
    while sent < total:
        yield b"a" * min(size, total - sent)
        sent += size
    yield b'"}'


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/chat/completions"])
def test_a_chunked_body_over_the_limit_is_a_413(platform: Platform, path: str) -> None:
    response = httpx.post(
        f"{platform.api_url}{path}",
        content=_chunks(MAX_BODY_BYTES + 1024),
        headers=JSON,
        timeout=60,
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text[:300]
    assert _envelope(response)["type"] == "request_too_large"


def test_a_chunked_body_under_the_limit_is_read(platform: Platform) -> None:
    body = b'{"model": "sim", "prompt": "small", "max_tokens": 1}'
    pieces = iter([body[:10], body[10:]])
    response = httpx.post(f"{platform.api_url}/v1/jobs", content=pieces, headers=JSON)
    assert "content-length" not in response.request.headers
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    "secret",
    [
        "caf\u00e9".encode(),
        b"\xff\xfe\x80garbage",
        ("iq_" + "\u00e9" * 40).encode(),
        BOOTSTRAP_KEY.encode() + "\u00e9".encode(),
    ],
)
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/models"])
def test_a_key_that_is_not_ascii_is_a_clean_401(
    platform: Platform, path: str, secret: bytes
) -> None:
    headers = {"Authorization": b"Bearer " + secret}
    response = httpx.get(f"{platform.api_url}{path}", headers=headers)
    assert response.status_code == 401, response.text
    assert _envelope(response)["message"] == "invalid API key"


def test_a_failed_job_tells_the_sdk_not_to_retry(platform: Platform) -> None:
    with (
        OpenAI(
            base_url=f"{platform.api_url}/v1", api_key=BOOTSTRAP_KEY, max_retries=0, timeout=60
        ) as client,
        pytest.raises(openai.APIStatusError) as raised,
    ):
        client.chat.completions.create(model="down", messages=HELLO, max_tokens=4)
    assert raised.value.status_code == 502
    # The platform retried the backend already; an SDK retry would find this same job.
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert "unreachable" in raised.value.message


LEAKY = "500 Server Error: Bad Gateway for url: http://10.20.30.40:8080/generate_stream"


def _failed_job_with_a_leaky_message(platform: Platform, idempotency_key: str, body: Any) -> str:
    """A failed job as a request with this Idempotency-Key and body would have left it."""
    request = ChatCompletionRequest.model_validate(body)
    job_id = str(uuid.uuid4())
    with psycopg.connect(platform.database_url, autocommit=True) as db:
        db.execute(
            "INSERT INTO jobs (id, tenant, requested_model, model, status, priority, input,"
            " params, attempts, metadata, idempotency_key, request_hash, error_type,"
            " error_message, finish_reason, created_at, finished_at) VALUES (%s, 'default',"
            " 'sim', 'sim', 'failed', 'interactive', '{}', '{}', 1, '{}', %s, %s,"
            " 'backend_unavailable', %s, 'error', now(), now())",
            (job_id, idempotency_key, request_digest(request, "chat"), LEAKY),
        )
    return job_id


def test_error_messages_do_not_name_backend_addresses(platform: Platform) -> None:
    body = {"model": "sim", "messages": HELLO, "max_tokens": 3}
    idempotency_key = str(uuid.uuid4())
    job_id = _failed_job_with_a_leaky_message(platform, idempotency_key, body)
    answer = httpx.post(
        f"{platform.api_url}/v1/chat/completions",
        json=body,
        headers={**AUTH, "Idempotency-Key": idempotency_key},
        timeout=30,
    )
    assert answer.status_code == 502, answer.text
    assert answer.headers["x-inferq-job-id"] == job_id
    job = httpx.get(f"{platform.api_url}/v1/jobs/{job_id}", headers=AUTH).json()
    for message in (answer.json()["error"]["message"], job["error"]["message"]):
        assert message.startswith("500 Server Error: Bad Gateway for url: ")
        assert "10.20.30.40" not in message
        assert "http://" not in message


# --- the openai SDK's own retries ------------------------------------------------------------


class DropFirstAnswer(ThreadingHTTPServer):
    """A proxy to the API that forwards every request but drops the first POST's answer.

    The API has saved the job by then: to the client it looks like a connection lost in
    the middle of the call, which the SDK retries.
    """

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = upstream
        self.lock = threading.Lock()
        self.posts: list[dict[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: DropFirstAnswer

    def do_GET(self) -> None:
        self._forward(drop=False)

    def do_POST(self) -> None:
        with self.server.lock:
            self.server.posts.append({k.lower(): v for k, v in self.headers.items()})
            first = len(self.server.posts) == 1
        self._forward(drop=first)

    def _forward(self, drop: bool) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        skip = {"host", "content-length", "connection", "accept-encoding"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        upstream = httpx.request(
            self.command,
            self.server.upstream + self.path,
            content=body,
            headers=headers,
            timeout=60,
        )
        if drop:
            self.close_connection = True
            return
        self.send_response(upstream.status_code)
        for name, value in upstream.headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(upstream.content)))
        self.end_headers()
        self.wfile.write(upstream.content)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def flaky_proxy(platform: Platform) -> Iterator[DropFirstAnswer]:
    proxy = DropFirstAnswer(platform.api_url)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def _job_count(platform: Platform, key: str) -> int:
    response = httpx.get(
        f"{platform.api_url}/v1/jobs",
        params={"limit": 100},
        headers={"Authorization": f"Bearer {key}"},
    )
    return len(response.json()["data"])


@pytest.mark.parametrize("stream", [False, True])
def test_the_sdks_retries_of_one_call_make_one_job(
    platform: Platform, flaky_proxy: DropFirstAnswer, stream: bool
) -> None:
    key = platform.new_key(f"sdk-retry-{uuid.uuid4().hex[:8]}")
    assert _job_count(platform, key) == 0
    with OpenAI(base_url=f"{flaky_proxy.url}/v1", api_key=key, max_retries=2, timeout=60) as sdk:
        params: dict[str, Any] = {"model": "sim", "messages": HELLO, "max_tokens": 8, "seed": 1}
        if stream:
            chunks = sdk.chat.completions.create(**params, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = sdk.chat.completions.create(**params).choices[0].message.content or ""
    assert text
    assert [p["x-stainless-retry-count"] for p in flaky_proxy.posts] == ["0", "1"]
    assert _job_count(platform, key) == 1


def test_separate_identical_calls_are_separate_jobs(platform: Platform) -> None:
    key = platform.new_key(f"sdk-twice-{uuid.uuid4().hex[:8]}")
    with OpenAI(base_url=f"{platform.api_url}/v1", api_key=key, max_retries=2) as sdk:
        for _ in range(2):
            sdk.chat.completions.create(model="sim", messages=HELLO, max_tokens=2, seed=1)
    assert _job_count(platform, key) == 2
