"""The workers' broker transport keeps kombu's record of the messages a worker took (the
unacked hash and its index), acknowledges them together, and loses none."""

from __future__ import annotations

import datetime as dt
import decimal
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Queue
from kombu.asynchronous import Hub, get_event_loop, set_event_loop
from kombu.utils.json import dumps, loads

from inferq.queue import UNACKED_KEY
from tests.servers import Databases
from workers import transport
from workers.sweeper import UNACKED_INDEX_KEY

TRANSPORT = "workers.transport:Transport"


@pytest.fixture
def client(databases: Databases) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(databases.redis_url)
    yield client
    client.close()


@pytest.fixture
def hub() -> Iterator[Hub]:
    """An event loop, as a Celery worker runs one (and sets it as kombu's current)."""
    before = get_event_loop()
    hub = Hub()
    set_event_loop(hub)
    yield hub
    set_event_loop(before)
    hub.close()


def _taken(connection: Connection, count: int) -> tuple[str, list]:
    """`count` messages published to a fresh queue and taken as a worker takes them: each in
    the unacked hash until acknowledged."""
    queue = f"inferq.test-acks-{uuid.uuid4().hex[:8]}"
    channel = connection.default_channel
    declare = [connection.SimpleQueue(queue).queue]
    with connection.Producer() as producer:
        for i in range(count):
            producer.publish({"n": i}, routing_key=queue, declare=declare)
    messages = [channel.basic_get(queue) for _ in range(count)]
    assert all(message is not None for message in messages)
    return queue, messages


def _held(client: redis.Redis, messages: list) -> int:
    """How many of the messages are in the unacked hash, and in its index as well."""
    held = [bool(client.hexists(UNACKED_KEY, m.delivery_tag)) for m in messages]
    indexed = [client.zscore(UNACKED_INDEX_KEY, m.delivery_tag) is not None for m in messages]
    assert held == indexed
    return sum(held)


def _records_read_back(client: redis.Redis, messages: list) -> None:
    """Each message's record in the unacked hash reads back as kombu's record of it."""
    for message in messages:
        record = client.hget(UNACKED_KEY, message.delivery_tag)
        delivery = message.delivery_info
        expected = [message._raw, delivery["exchange"], delivery["routing_key"]]
        assert _typed(loads(record)) == _typed(expected)


def test_a_workers_acknowledgements_go_together(
    databases: Databases, client: redis.Redis, hub: Hub
) -> None:
    with Connection(databases.redis_url, transport=TRANSPORT) as connection:
        queue, messages = _taken(connection, 3)
        assert _held(client, messages) == 3
        for message in messages:
            message.ack()
        assert _held(client, messages) == 3  # acknowledged, not yet sent
        assert connection.default_channel.qos.can_consume()  # but off the prefetch count
        time.sleep(transport.ACKS_FLUSH_S + 0.05)
        hub.fire_timers(propagate=(Exception,))
        assert _held(client, messages) == 0  # one round trip for the three
        assert client.llen(queue) == 0


def test_acknowledgements_still_pending_go_before_the_channel_closes(
    databases: Databases, client: redis.Redis, hub: Hub
) -> None:
    connection = Connection(databases.redis_url, transport=TRANSPORT)
    queue, messages = _taken(connection, 3)
    messages[0].ack()
    messages[1].ack()
    connection.close()  # the third goes back to its queue, the other two are done with
    try:
        assert _held(client, messages) == 0
        assert client.llen(queue) == 1
    finally:
        client.delete(queue)


def test_without_an_event_loop_a_message_is_acknowledged_at_once(
    databases: Databases, client: redis.Redis
) -> None:
    assert get_event_loop() is None
    with Connection(databases.redis_url, transport=TRANSPORT) as connection:
        _, messages = _taken(connection, 2)
        messages[0].ack()
        assert _held(client, messages) == 1
        messages[1].ack()
        assert _held(client, messages) == 0


def _publish(connection: Connection, queue: str, priorities: list[int]) -> None:
    declare = [Queue(queue, max_priority=10)]
    with connection.Producer() as producer:
        for i, priority in enumerate(priorities):
            producer.publish({"n": i}, routing_key=queue, declare=declare, priority=priority)


def _drop(client: redis.Redis, queue: str) -> None:
    """The queue's lists, one a priority."""
    for key in client.keys(f"{queue}*"):
        client.delete(key)


def _consumed(connection: Connection, queue: str, prefetch: int, turns: int) -> list[Any]:
    """What a consumer with this prefetch takes in `turns` turns of its connection."""
    taken: list[Any] = []
    consumer = connection.Consumer(
        [Queue(queue, max_priority=10)],
        callbacks=[lambda body, message: taken.append(message)],
        prefetch_count=prefetch,
    )
    with consumer:
        for _ in range(turns):
            connection.drain_events(timeout=5)
    return taken


def test_a_burst_is_taken_in_one_turn_in_kombus_order_and_every_message_recorded(
    databases: Databases, client: redis.Redis
) -> None:
    """A BRPOP brings as many messages as the prefetch allows (its script drains the same
    lists): in the order kombu's own transport takes them one at a time, each in the
    unacked hash; what the prefetch leaves stays queued."""
    priorities = [0, 9, 3, 9, 0, 6, 3, 0, 9, 9, 0, 3]
    queue = f"inferq.test-burst-{uuid.uuid4().hex[:8]}"
    try:
        with Connection(databases.redis_url) as stock:  # kombu's transport: one a BRPOP
            _publish(stock, queue, priorities)
            expected = [m.payload["n"] for m in _consumed(stock, queue, 20, len(priorities))]
            for message in stock.default_channel.qos._delivered.values():
                message.ack()
        assert sorted(expected) == list(range(len(priorities)))
        with Connection(databases.redis_url, transport=TRANSPORT) as connection:
            _publish(connection, queue, priorities)
            taken = _consumed(connection, queue, 8, 1)  # one turn
            assert [m.payload["n"] for m in taken] == expected[:8]
            assert _held(client, taken) == 8
            _records_read_back(client, taken)
            for message in taken:
                message.ack()
            rest = _consumed(connection, queue, 8, 1)
            assert [m.payload["n"] for m in rest] == expected[8:]
            assert _held(client, rest) == 4
            for message in rest:
                message.ack()
    finally:
        _drop(client, queue)


def test_a_broker_that_refuses_the_script_still_delivers_one_message_a_brpop(
    databases: Databases, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis before 6.2 refuses RPOP's count: the BRPOP's own message is delivered all the
    same, and the channel goes on as kombu's, one message a BRPOP, without the script."""
    refused = "return redis.error_reply('ERR wrong number of arguments for ''rpop'' command')"
    monkeypatch.setattr(transport, "DRAIN_SCRIPT", refused)
    queue = f"inferq.test-refused-{uuid.uuid4().hex[:8]}"
    try:
        with Connection(databases.redis_url, transport=TRANSPORT) as connection:
            _publish(connection, queue, [0, 0, 0])
            first = _consumed(connection, queue, 8, 1)
            assert [m.payload["n"] for m in first] == [0]
            assert _held(client, first) == 1
            rest = _consumed(connection, queue, 8, 2)
            assert [m.payload["n"] for m in rest] == [1, 2]
            assert _held(client, rest) == 2
            assert connection.default_channel._drain is False
    finally:
        _drop(client, queue)


def _typed(value: Any) -> Any:
    """The value with every type spelled out (1 == 1.0 == True, to `==`)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return type(value).__name__, repr(value)


def _value(rng: random.Random, depth: int = 0) -> Any:
    """Something kombu's JSON encoder takes: JSON's own types and the types it tags."""
    pick = rng.randrange(14 if depth < 3 else 10)
    text = "".join(rng.choice('ab_\\"\n\x01é€😀\ud800') for _ in range(rng.randrange(6)))
    if pick == 0:
        return rng.choice([None, True, False])
    if pick == 1:
        return rng.choice([0, -1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30])
    if pick == 2:
        return rng.choice([0.0, -0.0, 0.1, 1e300, 5e-324, 2.0**70, float("nan"), float("inf")])
    if pick in (3, 4):
        return text
    if pick == 5:
        return rng.choice(["__type__", "\\u00", "1" * 19, "1" * 18])
    if pick == 6:
        return dt.datetime(2026, 12, 6, 15, 0, rng.randrange(60), tzinfo=dt.UTC)
    if pick == 7:
        return rng.choice([uuid.uuid4(), decimal.Decimal("1.10"), b"\xff\x00", b"bytes"])
    if pick in (8, 9):
        return {"__type__": "datetime", "__value__": "2026-12-06T15:00:00"}
    if pick in (10, 11):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"{text}{i}": _value(rng, depth + 1) for i in range(rng.randrange(4))}


def test_json_loads_reads_what_kombus_loads_reads() -> None:
    """The JSON of a message's envelope and body reads as kombu's `loads` reads it, types and
    all: kombu's tagged types, big integers, NaN, escapes; what kombu refuses it refuses."""
    rng = random.Random(14)
    for _ in range(3000):
        encoded = dumps(_value(rng)).encode()
        assert _typed(transport.json_loads(encoded)) == _typed(loads(encoded)), encoded
    for text in [b'{"a": NaN}', b"[1e400]", b'["\\ud800"]', b'{"\\u005f_type__": 1}']:
        assert _typed(transport.json_loads(text)) == _typed(loads(text))
    for refused in [b"[1,", b"\xff[]", b'{"__type__": "nothing", "__value__": 1}']:
        with pytest.raises(ValueError):
            loads(refused)
        with pytest.raises(ValueError):
            transport.json_loads(refused)


def test_a_worker_reads_task_bodies_with_json_loads() -> None:
    from kombu.serialization import registry

    import workers.app  # noqa: F401  (the worker's Celery application registers it)

    assert registry._decoders["application/json"] is transport.json_loads
