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

A burst of jobs is taken in few round trips. kombu takes one message a BRPOP: a round trip,
a turn of the consumer's loop and, in a busy worker, a wait for the interpreter's lock, for
every job. Here each BRPOP is followed, in the same write, by a script that pops up to as
many more messages as the worker may still take (its prefetch, at most DRAIN_MAX), from the
same lists in the same order; Redis runs it as soon as the BRPOP is answered, so its reply
arrives with the BRPOP's, and an empty one costs no extra round trip. The messages it
brings are delivered one after the other, as the BRPOP's is, and their `unacked` records go
in one write after them (a worker killed in between leaves their jobs to the sweeper, which
enqueues a job again whose message is nowhere, as it does for one lost with a BRPOP's reply).

Each message is read by orjson (`json_loads`, which workers.app makes Celery's reader of task
bodies too) where orjson reads it as kombu's `loads` does, and its `unacked` record is made
of the JSON it came in rather than encoded again.

Celery selects it with `broker_transport` (inferq.queue.celery_config); the broker URL stays
`redis://`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from queue import Empty
from typing import Any
from urllib.parse import quote

import orjson
from kombu.asynchronous import get_event_loop
from kombu.serialization import registry
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
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
# The most messages a BRPOP's script takes besides the BRPOP's own.
DRAIN_MAX = 64
# Pops up to ARGV[1] messages from KEYS, in their order (a BRPOP's lists): key, message, ...
DRAIN_SCRIPT = """
local left = tonumber(ARGV[1])
local taken = {}
for _, key in ipairs(KEYS) do
  if left <= 0 then break end
  local popped = redis.call('RPOP', key, left)
  if popped then
    for _, message in ipairs(popped) do
      taken[#taken + 1] = key
      taken[#taken + 1] = message
    end
    left = left - #popped
  end
end
return taken
"""


# What orjson reads otherwise than kombu's JSON `loads`, or may: an object kombu encodes with
# its type ("__type__", which an escape could spell too), and an integer past 64 bits (a
# float to orjson), found as a run of 19 digits once every digit is made a zero (a regular
# expression costs more than the parse).
_TYPED, _ESCAPED = b"__type__", b"\\u00"
_ZEROS = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19


def json_loads(data: Any) -> Any:
    """kombu's JSON `loads`, by orjson where both read the same (half the CPU of kombu's on
    a task's message, the checks included).

    Bytes without any of the above go to orjson; whatever it refuses (NaN, a lone
    surrogate's escape, bytes that are not UTF-8) goes to kombu's, as does text."""
    if (
        isinstance(data, bytes)
        and _TYPED not in data
        and _ESCAPED not in data
        and _LONG_NUMBER not in data.translate(_ZEROS)
    ):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return loads(data)


def register_json() -> None:
    """Message bodies of type JSON decoded by `json_loads` in this process (kombu's own
    encoder kept): Celery decodes every task's body with kombu's serializer registry."""
    registry.register(
        "json", dumps, json_loads, content_type="application/json", content_encoding="utf-8"
    )


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: list[str] = []  # acknowledged, still in the unacked hash
        self._appends: list[bytes] | None = None  # records held for one write (`held`)
        # The message being delivered and the JSON it was read from (`Channel._brpop_read`).
        self.arriving: tuple[Any, bytes] | None = None

    def append(self, message: Any, delivery_tag: str) -> None:
        """As kombu's (the message into the unacked hash and its index), without the
        MULTI and EXEC around the two: both go in one write, and whoever reads them (kombu's
        restore, the sweeper) looks only at messages delivered long before."""
        delivery = message.delivery_info
        exchange, routing_key = delivery["exchange"], delivery["routing_key"]
        arriving = self.arriving
        if arriving is not None and arriving[0] is message._raw:
            # The record holds the message as the JSON it came in, not encoded once more:
            # whoever reads the record reads the same message.
            entry: str | bytes = b"[%s, %s, %s]" % (
                arriving[1],
                orjson.dumps(exchange),
                orjson.dumps(routing_key),
            )
        else:
            entry = dumps([message._raw, exchange, routing_key])
        # Packed by hiredis and sent on a pooled connection: a redis-py client and pipeline
        # built for every message cost more than the round trip itself.
        commands = pack(("ZADD", self.unacked_index_key, time.time(), delivery_tag))
        commands += pack(("HSET", self.unacked_key, delivery_tag, entry))
        if self._appends is not None:
            self._appends.append(commands)
        else:
            self._record([commands])
        virtual.QoS.append(self, message, delivery_tag)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The records of the messages delivered within, in one write as it ends."""
        self._appends = []
        try:
            yield
        finally:
            appends, self._appends = self._appends, None
            if appends:
                self._record(appends)

    def _record(self, appends: list[bytes]) -> None:
        pool = self.channel.pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([b"".join(appends)], check_health=False)
            for _ in range(2 * len(appends)):
                connection.read_response()
        except BaseException:
            connection.disconnect()  # a reply may be left unread: the next user starts clean
            raise
        finally:
            pool.release(connection)

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drain = True  # BRPOPs take their script along (the broker runs it)
        self._draining = False  # the BRPOP in flight has its script behind it

    def _brpop_start(self, timeout: float | None = None) -> None:
        """kombu's BRPOP, with the script that drains the same lists behind it."""
        prefetch = self.qos.can_consume_max_estimate()
        more = DRAIN_MAX if prefetch is None else min(prefetch - 1, DRAIN_MAX)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if more < 1 or not self._drain or self.global_keyprefix or not queues:
            self._draining = False
            super()._brpop_start(timeout)
            return
        if timeout is None:
            timeout = self.brpop_timeout
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu's is untyped
        self._draining = True
        commands = pack(("BRPOP", *keys, timeout or 0))
        commands += pack(("EVAL", DRAIN_SCRIPT, len(keys), *keys, more))
        self.client.connection.send_packed_command([commands], check_health=False)

    def _brpop_read(self, **options: Any) -> bool:
        if not self._draining:
            return bool(super()._brpop_read(**options))
        connection = self.client.connection
        try:
            try:
                popped = self.client.parse_response(connection, "BRPOP", **options)
                try:
                    drained = self.client.parse_response(connection, "EVAL", **options)
                except redis_errors.ResponseError as exc:  # a Redis before 6.2 (RPOP's count)
                    log.warning("the broker cannot take a burst in one round trip: %s", exc)
                    self._drain = False
                    drained = []
            except self.connection_errors:
                connection.disconnect()  # the next turn reconnects
                raise
            messages = [popped] if popped else []
            messages += zip(drained[::2], drained[1::2], strict=True)
            if not messages:
                raise Empty()
            self._queue_cycle.rotate(bytes_to_str(messages[0][0]).rsplit(self.sep, 1)[0])
            qos = self.qos
            with qos.held():
                for key, item in messages:
                    queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
                    payload = json_loads(item)
                    qos.arriving = payload, item
                    try:
                        self.connection._deliver(payload, queue)
                    finally:
                        qos.arriving = None
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # as kombu's own read sets it
            self._draining = False
            self._flush_brpop_reauth()

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
