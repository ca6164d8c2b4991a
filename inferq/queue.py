"""Celery on Redis, as both sides see it: configuration, queue names, enqueueing by task name."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from celery import Celery

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


class Enqueuer:
    """Publishes generate tasks and records which job ids reached the broker."""

    def __init__(self, app: Celery, redis: Any) -> None:
        self._app = app
        self._redis = redis  # sync redis.Redis

    def enqueue(self, items: Iterable[Enqueue]) -> None:
        """Publish in one Redis pipeline (kombu's batch), then mark the ids as handed over."""
        items = list(items)
        if not items:
            return
        with self._app.producer_or_acquire() as producer, producer.batch():
            for item in items:
                self._app.send_task(
                    GENERATE_TASK,
                    args=[item.job_id],
                    task_id=item.job_id,
                    queue=item.queue,
                    priority=PRIORITIES.get(item.priority, 0),
                    producer=producer,
                )
        # Marked after the publish: a crash in between leaves no mark, so the sweeper
        # re-enqueues (a harmless duplicate) rather than trusting a message that never left.
        now = time.time()
        self._redis.zadd(ENQUEUED_KEY, {item.job_id: now for item in items})

    def ping(self) -> None:
        """Raise unless the broker answers."""
        with self._app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def close(self) -> None:
        self._app.close()
