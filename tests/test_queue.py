"""The Celery messages inferq writes itself are the ones kombu would have written."""

from __future__ import annotations

import base64
import json

import redis

from inferq.queue import Enqueue, Enqueuer, make_producer_app, task_id_of
from inferq.settings import Settings
from tests.servers import Databases

VOLATILE = {"delivery_tag", "reply_to"}  # fresh per message


def _stored(client: redis.Redis, key: str) -> dict:
    message = json.loads(client.lpop(key))  # type: ignore[arg-type]
    message["body"] = json.loads(base64.b64decode(message["body"]))
    for name in VOLATILE:
        message["properties"].pop(name)
    message["headers"].pop("origin")
    return message


def test_messages_match_what_celery_send_task_writes(databases: Databases) -> None:
    app = make_producer_app(Settings(redis_url=databases.redis_url))
    client = redis.Redis.from_url(databases.redis_url)
    queue = "inferq.test-queue-format"
    client.delete(queue, f"{queue}:6")
    try:
        for priority, value in (("interactive", 0), ("batch", 6)):
            job_id = f"job-{priority}"
            with app.producer_or_acquire() as producer:
                app.send_task(
                    "inferq.generate",
                    args=[job_id],
                    task_id=job_id,
                    queue=queue,
                    priority=value,
                    producer=producer,
                    ignore_result=True,
                )
            Enqueuer(app).enqueue(client, [Enqueue(job_id, queue, priority)])
            key = f"{queue}:6" if value else queue
            assert client.llen(key) == 2
            ours, celerys = _stored(client, key), _stored(client, key)
            assert ours == celerys
        assert client.zscore("inferq:enqueued", "job-batch") is not None
    finally:
        client.delete(queue, f"{queue}:6")
        client.zrem("inferq:enqueued", "job-interactive", "job-batch")
        app.close()


def test_task_id_is_read_from_stored_messages(databases: Databases) -> None:
    """The sweeper finds a job's message by the task id kombu stores in its headers."""
    app = make_producer_app(Settings(redis_url=databases.redis_url))
    client = redis.Redis.from_url(databases.redis_url)
    queue = "inferq.test-queue-task-id"
    try:
        with app.producer_or_acquire() as producer:
            app.send_task(
                "inferq.generate", args=["job-a"], task_id="job-a", queue=queue, producer=producer
            )
        Enqueuer(app).enqueue(client, [Enqueue("job-b", queue)])
        stored = client.lrange(queue, 0, -1)
        assert sorted(task_id_of(m) or "" for m in stored) == ["job-a", "job-b"]
        # As kombu keeps a delivered message in its unacked hash: [message, exchange, key].
        unacked = json.dumps([json.loads(stored[0]), "", queue])
        assert task_id_of(unacked) == task_id_of(stored[0])
    finally:
        client.delete(queue)
        client.zrem("inferq:enqueued", "job-b")
        app.close()
