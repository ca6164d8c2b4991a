"""Celery on Redis, as both sides see it: configuration, queue names, enqueueing by task name."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu import serialization

from inferq.settings import Settings

GENERATE_TASK = "inferq.generate"
# Job ids whose Celery message was handed to Redis; lost together with the queue if Redis
# loses its data, which is exactly when the sweeper must enqueue them again.
ENQUEUED_KEY = "inferq:enqueued"

# On the Redis transport 0 is the highest priority (the opposite of RabbitMQ).
PRIORITIES = {"interactive": 0, "batch": 6}
PRIORITY_SEP = ":"  # kombu names priority lists "queue:N"


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {
        "visibility_timeout": settings.visibility_timeout_seconds,
        "queue_order_strategy": "priority",
        "priority_steps": list(range(10)),
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


def list_key(queue: str, priority: int) -> str:
    """The Redis list kombu keeps a queue's messages of one priority in."""
    return f"{queue}{PRIORITY_SEP}{priority}" if priority else queue


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
            item.job_id, GENERATE_TASK, args=[item.job_id], kwargs={}, ignore_result=True
        )
        content_type, encoding, body = serialization.dumps(message.body, serializer="json")
        raw = body.encode(encoding) if isinstance(body, str) else body
        priority = PRIORITIES.get(item.priority, 0)
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

    async def enqueue_async(self, redis: Any, items: Iterable[Enqueue]) -> None:
        """The same through an asyncio client (redis.asyncio.Redis on the broker)."""
        items = list(items)
        if items:
            async with redis.pipeline(transaction=False) as pipe:
                _queue_commands(pipe, self._builder, items)
                await pipe.execute()

    def close(self) -> None:
        self._app.close()
