"""Webhooks: signed deliveries of a job's end, retries, the event filter and the URL guard."""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psycopg
import pytest
import trustme
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from inferq.db import make_sync_engine
from inferq.settings import Settings
from inferq.webhooks import (
    UnsafeUrl,
    check_url,
    delivery_addresses,
    new_secret,
    sign,
    wanted,
)
from tests.conftest import BOOTSTRAP_KEY, Platform, submit, wait_for
from tests.servers import free_port, wait_http
from workers.webhooks import Message, Try, post, record, retry_delay

PRIVATE_URLS = [
    "http://127.0.0.1:8080/hook",
    "http://10.1.2.3/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]:8080/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://localhost:8080/hook",
]


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers the given statuses in turn, then 200."""

    def __init__(self, answers: list[int] | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.answers = list(answers or [])
        self.received: list[Received] = []
        self.server_names: list[str | None] = []  # the TLS clients' SNI
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    receiver.received.append(Received(dict(self.headers.items()), body))
                    status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def wait(self, count: int, timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"{len(self.received)} of {count} webhook requests in {timeout}s")
            time.sleep(0.02)
        return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def _db(platform: Platform) -> psycopg.Connection:
    return psycopg.connect(platform.database_url.replace("+psycopg", ""), autocommit=True)


def _deliveries(platform: Platform, job_id: str) -> list[tuple[Any, ...]]:
    with _db(platform) as db:
        return db.execute(
            "SELECT attempt, status_code, error, next_try_at, delivered_at"
            " FROM webhook_deliveries WHERE job_id = %s ORDER BY attempt",
            (job_id,),
        ).fetchall()


def _wait_settled(platform: Platform, job_id: str, timeout: float = 30.0) -> None:
    """Until the job's webhook needs nothing more (delivered, given up or not wanted)."""
    deadline = time.monotonic() + timeout
    with _db(platform) as db:
        while not db.execute("SELECT webhook_done FROM jobs WHERE id = %s", (job_id,)).fetchone()[
            0
        ]:
            if time.monotonic() > deadline:
                pytest.fail(f"webhook of job {job_id} not settled within {timeout}s")
            time.sleep(0.05)


def _secret(platform: Platform, key: str) -> str:
    with platform.client(key) as http:
        response = http.get("/v1/webhooks/secret")
    assert response.status_code == 200, response.text
    return str(response.json()["secret"])


def test_succeeded_job_posts_its_json_signed_with_the_tenant_secret(
    platform: Platform, receiver: Receiver
) -> None:
    key = platform.new_key("webhook-signed")
    with platform.client(key) as http:
        job = submit(http, prompt="ring me", max_tokens=8, webhook={"url": receiver.url})
        done = wait_for(http, job["id"])
    [request] = receiver.wait(1)
    secret = _secret(platform, key)  # made by the first delivery, handed out here
    assert secret.startswith("whsec_")
    payload = Webhook(secret).verify(request.body, request.headers)
    assert payload["id"] == job["id"] == request.headers["webhook-id"]
    for field in ("status", "output", "finish_reason", "usage", "timings", "metadata"):
        assert payload[field] == done[field], field
    assert payload["status"] == "succeeded"
    assert request.headers["content-type"] == "application/json"
    _wait_settled(platform, job["id"])
    [(attempt, status_code, error, next_try_at, delivered_at)] = _deliveries(platform, job["id"])
    assert (attempt, status_code, error, next_try_at) == (1, 200, None, None)
    assert delivered_at is not None
    assert _secret(platform, key) == secret
    assert _secret(platform, platform.new_key("webhook-other-tenant")) != secret


def test_failing_receiver_is_retried_until_it_answers_2xx(platform: Platform) -> None:
    receiver = Receiver([500, 500])
    key = platform.new_key("webhook-retried")
    try:
        with platform.client(key) as http:
            job = submit(http, prompt="retry me", max_tokens=4, webhook={"url": receiver.url})
        requests = receiver.wait(3)
        _wait_settled(platform, job["id"])
    finally:
        receiver.close()
    rows = _deliveries(platform, job["id"])
    assert [(r[0], r[1]) for r in rows] == [(1, 500), (2, 500), (3, 200)]
    assert all(r[3] is not None and r[4] is None for r in rows[:2])  # a next try, no delivery
    assert rows[2][3] is None and rows[2][4] is not None
    assert rows[0][3] < rows[1][3]  # later tries wait longer
    assert len({r.headers["webhook-id"] for r in requests}) == 1  # the same message each time
    verifier = Webhook(_secret(platform, key))
    assert all(verifier.verify(r.body, r.headers)["id"] == job["id"] for r in requests)


def test_event_filter_skips_an_end_not_asked_for(platform: Platform, receiver: Receiver) -> None:
    with platform.client() as http:
        job = submit(
            http,
            prompt="filter me",
            max_tokens=4,
            webhook={"url": receiver.url, "events": ["failed"]},
        )
        assert wait_for(http, job["id"])["status"] == "succeeded"
    _wait_settled(platform, job["id"])
    assert _deliveries(platform, job["id"]) == []
    assert receiver.received == []


def test_cancelled_queued_job_gets_its_webhook(platform: Platform, receiver: Receiver) -> None:
    with platform.client() as http:
        job = submit(
            http,
            model="parked",
            prompt="nobody serves this queue",
            max_tokens=4,
            webhook={"url": receiver.url, "events": ["cancelled"]},
        )
        assert http.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    secret = _secret(platform, BOOTSTRAP_KEY)
    [request] = receiver.wait(1)
    payload = Webhook(secret).verify(request.body, request.headers)
    assert (payload["id"], payload["status"]) == (job["id"], "cancelled")


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_delivery_guard_refuses_non_global_addresses(url: str) -> None:
    with pytest.raises(UnsafeUrl, match="not a public address"):
        delivery_addresses(url, allow_private=False)
    assert delivery_addresses(url, allow_private=True)


@pytest.mark.parametrize("url", PRIVATE_URLS)
async def test_submit_guard_refuses_non_global_addresses(url: str) -> None:
    with pytest.raises(UnsafeUrl, match="not a public address"):
        await check_url(url, allow_private=False, seconds=5)
    await check_url(url, allow_private=True, seconds=5)


async def test_guard_accepts_a_public_address() -> None:
    await check_url("https://93.184.216.34/hook", allow_private=False, seconds=5)
    assert delivery_addresses("https://93.184.216.34/hook", False) == ["93.184.216.34"]


def test_delivery_to_a_private_address_is_recorded_not_sent(receiver: Receiver) -> None:
    message = Message(uuid.uuid4(), receiver.url, b"{}", new_secret(), 1, datetime.now(UTC))
    with httpx.Client() as http:
        result = post(http, message, allow_private=False)
    assert result.refused and result.status_code is None
    assert "not a public address" in str(result.error)
    assert receiver.received == []


def test_tls_delivery_goes_to_the_checked_address_under_the_url_host_name() -> None:
    """The connection is made to the resolved address, yet SNI and the certificate check use
    the URL's host: the certificate names only "localhost", not 127.0.0.1."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    receiver = Receiver(tls=server_tls)
    url = f"https://localhost:{receiver.port}/hook"
    message = Message(uuid.uuid4(), url, b'{"ok": true}', new_secret(), 1, datetime.now(UTC))
    try:
        with httpx.Client(verify=client_tls) as http:
            result = post(http, message, allow_private=True)
    finally:
        receiver.close()
    assert result.ok, result
    [request] = receiver.received
    assert request.headers["host"] == f"localhost:{receiver.port}"
    assert receiver.server_names == ["localhost"]
    assert Webhook(message.secret).verify(request.body, request.headers) == {"ok": True}


def test_submit_refuses_a_private_webhook_url_with_422(platform: Platform) -> None:
    port = free_port()
    api = platform.spawn(
        "api", "--port", str(port), name="api-strict", INFERQ_WEBHOOK_ALLOW_PRIVATE="false"
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz", api)
    with platform.client() as http:
        for hook in ("http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.0.0.8/"):
            response = http.post(
                f"{url}/v1/jobs", json={"model": "sim", "prompt": "x", "webhook": {"url": hook}}
            )
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["type"] == "invalid_request"
            assert "not a public address" in error["message"]
    api.stop()


def test_give_up_after_the_retry_window(platform: Platform) -> None:
    with platform.client() as http:
        job = submit(
            http,
            model="parked",
            prompt="long gone",
            max_tokens=4,
            webhook={"url": "http://127.0.0.1:9/hook", "events": ["failed"]},
        )
        http.post(f"/v1/jobs/{job['id']}/cancel")
    _wait_settled(platform, job["id"])  # not wanted: nothing sent, no rows
    ended = datetime.now(UTC) - timedelta(days=2)
    message = Message(uuid.UUID(job["id"]), "http://127.0.0.1:9/hook", b"{}", "", 1, ended)
    engine = make_sync_engine(platform.database_url, pool_size=1)
    try:
        with Session(engine) as session, session.begin():
            outcome = record(session, message, Try(status_code=503, error="busy"), Settings())
    finally:
        engine.dispose()
    assert outcome == "gave_up"
    [(attempt, status_code, error, next_try_at, delivered_at)] = _deliveries(platform, job["id"])
    assert (attempt, status_code, error, next_try_at, delivered_at) == (1, 503, "busy", None, None)


def test_back_off_grows_with_jitter_up_to_the_cap() -> None:
    low = [retry_delay(n, 5.0, 3600.0, rand=lambda: 0.0) for n in range(1, 15)]
    high = [retry_delay(n, 5.0, 3600.0, rand=lambda: 1.0) for n in range(1, 15)]
    assert low[:3] == [2.5, 5.0, 10.0] and high[:3] == [5.0, 10.0, 20.0]
    assert low == sorted(low) and high[-1] == 3600.0 and low[-1] == 1800.0


def test_signature_matches_the_reference_verifier() -> None:
    secret = new_secret()
    body = b'{"id": "x", "output": "caf\\u00e9"}'
    timestamp = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, "msg_1", timestamp, body),
    }
    assert Webhook(secret).verify(body, headers)["id"] == "x"


def test_events_default_to_every_end() -> None:
    assert wanted({"url": "u"}, "expired")
    assert not wanted({"url": "u", "events": []}, "failed")
    assert not wanted(None, "succeeded")
