"""The workers' broker transport keeps kombu's record of the messages a worker took (the
unacked hash and its index), acknowledges them together, and loses none."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Queue
from kombu.asynchronous import Hub, get_event_loop, set_event_loop

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
