"""`python -m bench.redis_write`: what a stream write costs the worker's loop in CPU, through
redis-py's asyncio pipeline (how the loop wrote before) and through its lean connection
(inferq/resp.py), on the same Redis, the same script and the same arguments; and what the
API's read of a stream's replay costs, each way.

Four shapes: one stream's write alone in its round trip (a job's `status`, its first
token, its end), `--streams` streams' writes in one pipeline (a flush tick), an event
stream's replay as the API reads it when a client opens the stream (XRANGE of a stream
the writes filled, parsed into events), and the API hub's read of pub/sub messages
(redis-py's `PubSub.get_message`, as the hub read them before, against the hub's own
subscribed connection, `inferq.resp.PushProtocol`): a script publishes PUBLISHED messages
at a time, and the next go once all have been read. One JSON line a shape and a round:
the CPU per command (per message for the last), each way. The keys and the channel are
the bench's own and deleted afterwards. Redis as `inferq bench` takes it (an embedded one
without the URL).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import click
import uvloop

from bench.servers import redis_or_embedded
from inferq.events import (
    PUBLISH_SCRIPT,
    PUBLISH_SHA,
    Event,
    fence,
    from_entries,
    from_reply,
    script_args,
    script_keys,
    stream_key,
)
from inferq.protocol import TokenData
from inferq.redis_clients import async_client
from inferq.resp import PushProtocol, RespLink, pack

Write = Callable[[list[list[str]]], Awaitable[Any]]
# Events in the replayed stream: a status and a few flushes' tokens, a short job's.
REPLAYED = 4
# Messages a pub/sub round publishes (one script call), for the reader to read.
PUBLISHED = 16
_PUBLISH_MANY = "for _ = 1, tonumber(ARGV[1]) do redis.call('PUBLISH', KEYS[1], ARGV[2]) end"
# A token event's message as workers publish it.
_TOKEN = Event.of(TokenData(text=" a few tokens of text", tokens=4))
_MESSAGE = f"1765000000000-0\n{_TOKEN.type.value}\n{_TOKEN.data}"


def _args(continuing: bool) -> list[str | int]:
    token = Event.of(TokenData(text=" a few tokens of text", tokens=4))
    return script_args([token], 1000, 0, fence(1, str(uuid.uuid4())), continuing)


async def _cpu_per_write(write: Write, streams: list[list[str]], rounds: int) -> float:
    await write(streams)  # the connection made, the script loaded
    started = time.process_time()
    for _ in range(rounds):
        await write(streams)
    return (time.process_time() - started) / (rounds * len(streams)) * 1e6


async def _measure(redis_url: str, streams: int, writes: int, repeat: int) -> None:
    client = async_client(redis_url, 4)
    link = RespLink(redis_url)
    await client.script_load(PUBLISH_SCRIPT)
    args = _args(continuing=False)
    jobs = [f"bench-redis-write-{uuid.uuid4()}" for _ in range(streams)]
    every = [script_keys(job) for job in jobs]

    async def redis_py(keys_of: list[list[str]]) -> Any:
        pipe = client.pipeline(transaction=False)
        for keys in keys_of:
            pipe.evalsha(PUBLISH_SHA, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)

    async def lean(keys_of: list[list[str]]) -> Any:
        packed = [pack(("EVALSHA", PUBLISH_SHA, len(keys), *keys, *args)) for keys in keys_of]
        return await link.execute(b"".join(packed), len(packed))

    replayed = stream_key(f"bench-redis-write-{uuid.uuid4()}")  # no write touches it
    await client.xadd(replayed, {"e": "status", "d": '{"status":"running"}'})
    for _ in range(REPLAYED - 1):
        await client.xadd(replayed, {"e": "token", "d": '{"text":" a few tokens","tokens":4}'})

    async def redis_py_replay(_: list[list[str]]) -> Any:
        return from_entries(await client.xrange(replayed, min="-", max="+"))

    async def lean_replay(_: list[list[str]]) -> Any:
        return from_reply(await link.call("XRANGE", replayed, "-", "+", retry=True))

    pubsub_redis_py, pubsub_lean, pubsub_close = await _pubsub_readers(client, link, redis_url)
    try:
        for _ in range(repeat):
            for shape, keys_of, rounds in (
                ("alone", every[:1], writes),
                (f"{streams} in a pipeline", every, max(1, writes // streams)),
            ):
                figures: dict[str, object] = {"shape": shape}
                for name, write in (("redis_py", redis_py), ("lean", lean)):
                    cpu_us = await _cpu_per_write(write, keys_of, rounds)
                    figures[f"{name}_cpu_us_per_write"] = round(cpu_us, 1)
                click.echo(json.dumps(figures))
            replay: dict[str, object] = {"shape": f"replay of {REPLAYED} events"}
            for name, read in (("redis_py", redis_py_replay), ("lean", lean_replay)):
                cpu_us = await _cpu_per_write(read, every[:1], writes)
                replay[f"{name}_cpu_us_per_write"] = round(cpu_us, 1)
            click.echo(json.dumps(replay))
            messages: dict[str, object] = {"shape": f"pub/sub, {PUBLISHED} messages a publish"}
            for name, take in (("redis_py", pubsub_redis_py), ("lean", pubsub_lean)):
                cpu_us = await _cpu_per_write(take, every[:1], writes // PUBLISHED)
                messages[f"{name}_cpu_us_per_message"] = round(cpu_us / PUBLISHED, 1)
            click.echo(json.dumps(messages))
    finally:
        await pubsub_close()
        await client.delete(replayed, *(key for keys in every for key in keys))
        await client.aclose()
        await link.close()


async def _pubsub_readers(
    client: Any, link: RespLink, redis_url: str
) -> tuple[Write, Write, Callable[[], Awaitable[None]]]:
    """Two reads of PUBLISHED messages of a channel of the bench's own: through redis-py's
    PubSub (the API's client options, health check included) and through a PushProtocol;
    and what closes both."""
    name = f"bench-redis-write-{uuid.uuid4()}"
    pubsub = client.pubsub()
    await pubsub.subscribe(name)
    while await pubsub.get_message(timeout=5) is None:
        pass  # the confirmation
    pushes: list[Any] = []
    arrived: list[asyncio.Future[None]] = []

    def on_push(push: Any) -> None:
        pushes.append(push)
        if len(pushes) >= PUBLISHED and arrived and not arrived[0].done():
            arrived[0].set_result(None)

    subscribed = RespLink(redis_url, factory=lambda: PushProtocol(on_push))
    connection = await subscribed.connected()
    assert isinstance(connection, PushProtocol)
    connection.send(pack(("SUBSCRIBE", name)))

    async def publish() -> None:
        await link.call("EVAL", _PUBLISH_MANY, 1, name, PUBLISHED, _MESSAGE)

    async def redis_py(_: list[list[str]]) -> None:
        await publish()
        read = 0
        while read < PUBLISHED:
            message = await pubsub.get_message(timeout=5)
            if message is not None and message["type"] == "message":
                read += 1

    async def lean(_: list[list[str]]) -> None:
        pushes.clear()
        arrived[:] = [asyncio.get_running_loop().create_future()]
        await publish()
        await arrived[0]

    async def close() -> None:
        await pubsub.aclose()
        await subscribed.close()

    await lean([])  # the confirmation out of the way
    return redis_py, lean, close


@click.command()
@click.option("--redis-url", default=None, help="Redis URL (else an embedded one)")
@click.option("--streams", default=64, show_default=True, help="writes in a tick's pipeline")
@click.option("--writes", default=4000, show_default=True, help="writes a shape and a way")
@click.option("--repeat", default=2, show_default=True)
def main(redis_url: str | None, streams: int, writes: int, repeat: int) -> None:
    with redis_or_embedded(redis_url) as url:
        uvloop.run(_measure(url, streams, writes, repeat))


if __name__ == "__main__":
    main()
