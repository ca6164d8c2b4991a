"""Celery on Redis, as both sides see it: configuration, queue names, enqueueing by task name."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu import serialization

from inferq.resp import RespLink, recorded
from inferq.settings import Settings

GENERATE_TASK = "inferq.generate"
# Job ids whose Celery message was handed to Redis; lost together with the queue if Redis
# loses its data, which is exactly when the sweeper must enqueue them again.
ENQUEUED_KEY = "inferq:enqueued"

# On the Redis transport 0 is the highest priority (the opposite of RabbitMQ).
PRIORITIES = {"interactive": 0, "batch": 6}
PRIORITY_SEP = ":"  # kombu names priority lists "queue:N"
PRIORITY_STEPS = range(10)
# kombu's hash of messages delivered to a consumer and not yet acked (its `unacked_key`).
UNACKED_KEY = "unacked"
# The task id in a stored message's headers (`"root_id"` and `"correlation_id"` do not match:
# a quote must precede `id`); the task id of `inferq.generate` is the job id.
_TASK_ID = re.compile(r'"id": ?"([^"]+)"')


SWEEPER_LAST_RUN_KEY = "last_run"  # Unix time of the sweeper's last complete pass


def sweeper_key(prefix: str, name: str) -> str:
    """A key of the sweeper's own state, one set per deployment."""
    return f"inferq:sweeper:{prefix}:{name}"


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {
        "visibility_timeout": settings.visibility_timeout_seconds,
        "queue_order_strategy": "priority",
        "priority_steps": list(PRIORITY_STEPS),
        "sep": PRIORITY_SEP,
        "socket_timeout": 30,
        "socket_connect_timeout": 10,
        "health_check_interval": 25,
    }
    return {
        "broker_url": settings.broker,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "worker_soft_shutdown_timeout": 5.0,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
    }


def make_producer_app(settings: Settings) -> Celery:
    """A Celery app with no tasks: enough to send `inferq.generate` by name."""
    app = Celery("inferq-producer")
    app.conf.update(celery_config(settings))
    return app


@dataclass(frozen=True, slots=True)
class Enqueue:
    job_id: str
    queue: str
    priority: str = "interactive"
    # What Flower shows as the task's arguments (the worker reads only the job id).
    label: str = ""
    # Redis priority steps below the asked priority, for fair share between tenants
    # (inferq.fairness); the sweeper and hand-backs enqueue with none.
    shift: int = 0


def redis_priority(priority: str, shift: int = 0) -> int:
    """The Redis priority of a job: its class's base, lowered by `shift` steps."""
    return min(PRIORITIES.get(priority, 0) + shift, PRIORITY_STEPS[-1])


def list_key(queue: str, priority: int) -> str:
    """The Redis list kombu keeps a queue's messages of one priority in."""
    return f"{queue}{PRIORITY_SEP}{priority}" if priority else queue


def priority_lists(queue: str) -> list[str]:
    """Every Redis list behind one Celery queue, highest priority first."""
    return [list_key(queue, p) for p in PRIORITY_STEPS]


def task_id_of(stored: str | bytes) -> str | None:
    """The task id of a message as kombu stores it (in a queue's list or the unacked hash)."""
    found = _TASK_ID.search(stored.decode() if isinstance(stored, bytes) else stored)
    return found.group(1) if found else None


class MessageBuilder:
    """Celery task messages for `inferq.generate`, exactly as kombu's Redis transport stores them.

    Celery builds the message (`as_task_v2`) and kombu serializes its body; only the last step
    of kombu's publish, one LPUSH onto the queue's list, is left to the caller, so that a batch
    of messages and their enqueue marks go to Redis in one pipelined round trip.
    """

    def __init__(self, app: Celery) -> None:
        self._app = app

    def build(self, item: Enqueue) -> tuple[str, str]:
        """(Redis list key, payload) for one job."""
        message = self._app.amqp.as_task_v2(
            item.job_id,
            GENERATE_TASK,
            args=[item.job_id],
            kwargs={},
            ignore_result=True,
            argsrepr=f"{[item.job_id]!r} {item.label}".rstrip(),
        )
        dumps: Any = serialization.dumps  # kombu is untyped
        content_type, encoding, body = dumps(message.body, serializer="json")
        raw = body.encode(encoding) if isinstance(body, str) else body
        priority = redis_priority(item.priority, item.shift)
        payload = {
            "body": base64.b64encode(raw).decode("ascii"),
            "content-encoding": encoding,
            "content-type": content_type,
            "headers": message.headers,
            "properties": {
                **message.properties,
                "reply_to": self._app.thread_oid,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": item.queue},
                "priority": priority,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        return list_key(item.queue, priority), json.dumps(payload)


def _queue_commands(pipe: Any, builder: MessageBuilder, items: list[Enqueue]) -> None:
    # The messages first, then their marks: a failure in between leaves a message without a
    # mark (the sweeper re-enqueues it: a harmless duplicate), never a mark without a message.
    for item in items:
        key, payload = builder.build(item)
        pipe.lpush(key, payload)
    now = time.time()
    pipe.zadd(ENQUEUED_KEY, {item.job_id: now for item in items})


class Enqueuer:
    """Publishes generate tasks and marks their job ids, in one round trip per batch."""

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._builder = MessageBuilder(app)

    def enqueue(self, redis: Any, items: Iterable[Enqueue]) -> None:
        """Through a sync client (redis.Redis) on the broker."""
        items = list(items)
        if items:
            with redis.pipeline(transaction=False) as pipe:
                _queue_commands(pipe, self._builder, items)
                pipe.execute()

    async def enqueue_async(self, link: RespLink, items: Iterable[Enqueue]) -> None:
        """The same on an asyncio loop's lean connection to the broker. Sent again after a
        lost connection: a message pushed twice is a harmless duplicate (the claim runs a
        job once)."""
        items = list(items)
        if items:
            commands = recorded(lambda pipe: _queue_commands(pipe, self._builder, items))
            await link.run(commands, retry=True)

    def close(self) -> None:
        self._app.close()
