"""The broker transport of workers and beat: kombu's Redis transport, made to survive a Redis
that goes away (and may come back empty) under a connected consumer.

When Celery loses the broker connection it cleans up before reconnecting: `collect()` closes
what it can and detaches the transport from its connection, then `close()` closes the channel
again, and the channel's QoS puts the messages this consumer took and has not acknowledged
back on their queues. By then the channel has dropped its connection pool, and its transport
no longer knows the broker's address, so kombu's channel fails to build a client with an
AttributeError. Celery does not count that as a connection error: the worker exits. Here a
channel whose connection is gone raises redis's ConnectionError instead, which kombu and
Celery handle as the lost connection it is, and the restore on close gives up on a broker it
cannot reach instead of failing the close.

Giving up that restore loses nothing:
- the messages stay in the broker's `unacked` hash while Redis keeps its data: kombu restores
  them after the visibility timeout, and the sweeper enqueues their jobs again long before
  (a running job whose lease lapsed; a queued job whose message sat in `unacked` past the
  orphan threshold, see workers/sweeper.py);
- when Redis comes back empty there is nothing to restore: the sweeper enqueues again every
  queued job that lost its enqueue mark and every running job whose lease lapsed;
- with the threads pool the tasks behind those messages go on running through the reconnect,
  so putting their messages back would only queue duplicates (which the claim skips).

Its QoS also keeps kombu's record of the messages a worker took at less cost. kombu writes
a message into its `unacked` hash and that hash's index in a MULTI/EXEC transaction, and
takes each acknowledged one off both at once, a round trip of the consumer's own for every
task. Here the first write is the same two commands without the transaction (they go in
one write, and whoever reads them, kombu's restore and the sweeper, looks only at messages
delivered long before); and in a worker (where Celery runs an event loop) the
acknowledgements of ACKS_FLUSH_S go in one round trip, those still pending when the
channel closes before it closes. One the worker could not send (killed, or the broker
away) leaves its message to come back after the visibility timeout, like one acknowledged
as the broker went away: the job behind it has ended, so its claim skips it.

Celery selects it with `broker_transport` (inferq.queue.celery_config); the broker URL stays
`redis://`.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import quote

from kombu.asynchronous import get_event_loop
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps
from kombu.utils.url import as_url
from redis import exceptions as redis_errors

from inferq.resp import pack

log = logging.getLogger("inferq.worker")

# The errors of a broker that cannot be reached (BusyLoadingError, a Redis still loading its
# data, is a ConnectionError too).
UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError)

# Acknowledgements wait this long to go together; past ACKS_BATCH of them they go at once.
ACKS_FLUSH_S = 0.25
ACKS_BATCH = 500


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: list[str] = []  # acknowledged, still in the unacked hash

    def append(self, message: Any, delivery_tag: str) -> None:
        """As kombu's (the message into the unacked hash and its index), without the
        MULTI and EXEC around the two: both go in one write, and whoever reads them (kombu's
        restore, the sweeper) looks only at messages delivered long before."""
        delivery = message.delivery_info
        entry = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        # Packed by hiredis and sent on a pooled connection: a redis-py client and pipeline
        # built for every message cost more than the round trip itself.
        commands = pack(("ZADD", self.unacked_index_key, time.time(), delivery_tag))
        commands += pack(("HSET", self.unacked_key, delivery_tag, entry))
        pool = self.channel.pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([commands], check_health=False)
            connection.read_response()
            connection.read_response()
        except BaseException:
            connection.disconnect()  # a reply may be left unread: the next user starts clean
            raise
        finally:
            pool.release(connection)
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        hub = get_event_loop()
        if hub is None:  # no event loop (beat, Flower, a plain consumer): at once, as kombu
            super().ack(delivery_tag)
            return
        virtual.QoS.ack(self, delivery_tag)  # off the prefetch count now
        self._acks.append(delivery_tag)
        if len(self._acks) >= ACKS_BATCH:
            self.flush_acks()
        elif len(self._acks) == 1:
            hub.call_later(ACKS_FLUSH_S, self.flush_acks)

    def flush_acks(self) -> None:
        """Take the acknowledged messages off the unacked hash and its index, together."""
        tags, self._acks = self._acks, []
        if not tags:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        except UNREACHABLE as exc:
            log.warning(
                "broker unreachable: %d acknowledged messages left in its unacked hash, to come"
                " back after the visibility timeout and be skipped (%s)",
                len(tags),
                exc,
            )

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        self.flush_acks()
        return super().restore_unacked_once(stderr)

    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)
        except UNREACHABLE as exc:
            log.warning(
                "broker unreachable while closing the channel: %d unacknowledged messages"
                " left for the sweeper (%s)",
                len(self._delivered),
                exc,
            )
            self._delivered.clear()


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport is None or transport.client is None:
            # The connection was closed: no broker address is left to connect to.
            raise redis_errors.ConnectionError("the broker connection is closed")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        # kombu's Connection parses the URL itself when the transport class says it cannot
        # (as kombu's own Redis transport does), and asks the transport instance for the URL
        # to show when the instance says it can: so the URL shown (by Flower, which picks its
        # broker client by the scheme, and in the logs) is the `redis://` one, not one named
        # after this class.
        self.can_parse_url = True

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        if self.client is None:  # closed: let the connection say it as kombu would
            raise NotImplementedError
        info = self.client.info()
        password = info["password"] if include_password else mask
        if callable(password):
            password = password()
        return str(
            as_url(
                "redis",
                info["hostname"],
                info["port"],
                info["userid"],
                password,
                quote(str(info["virtual_host"])),
                sanitize=not include_password,
                mask=mask,
            )
        )
