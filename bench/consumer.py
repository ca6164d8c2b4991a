"""`python -m bench.consumer`: what Celery costs a worker process for one task, apart from the
task: taking its message, running it on a thread, its task events, acknowledging it.

A Celery worker set up as the platform's (`inferq.queue.celery_config`, the workers' broker
transport, task events step and logging, the command line `inferq worker` runs; its log
lines go nowhere) is given a task that does nothing, and `--tasks` messages for it, queued
as the API queues a job's. One JSON line
a run: the worker's CPU seconds (user and system) from the first message to
the last one acknowledged, over the tasks; and the Redis commands the server ran meanwhile,
over the tasks. Redis as `inferq bench` takes it (an embedded one without the URL).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import click
import redis
from celery import Celery, signals

from bench.cluster import cpu_seconds
from bench.servers import redis_or_embedded
from inferq.logs import configure_worker_logging
from inferq.processes import Child
from inferq.queue import (
    ENQUEUED_KEY,
    UNACKED_KEY,
    Enqueue,
    Enqueuer,
    celery_config,
    make_producer_app,
)
from inferq.settings import Settings
from workers.nodes import celery_args
from workers.task_events import TaskEventsTogether

NOOP_TASK = "inferq.generate"  # the name the messages carry, as the API's do
WARM_TASKS = 50
DEVNULL = Path(os.devnull)


def make_app(settings: Settings) -> Celery:
    app = Celery("inferq-consumer-bench")
    app.steps["consumer"].add(TaskEventsTogether)
    app.conf.update(celery_config(settings))
    app.conf.broker_transport = "workers.transport:Transport"

    @app.task(name=NOOP_TASK, ignore_result=True)
    def generate(job_id: str) -> None:
        del job_id

    return app


@signals.setup_logging.connect
def _logging(**_: Any) -> None:
    configure_worker_logging("INFO")  # as the platform's workers log, by default


# The app the worker process loads (`celery -A bench.consumer:app`), on the URL it is given.
app = make_app(Settings(redis_url=os.environ.get("INFERQ_REDIS_URL", "redis://127.0.0.1:6379/0")))


def _cpu_s(pid: int) -> float:
    seconds = cpu_seconds(pid)
    if seconds is None:
        raise SystemExit("the worker exited")
    return seconds


def _commands(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(stat["calls"]) for stat in stats.values())


def _drained(client: redis.Redis, queue: str, timeout_s: float = 600) -> None:
    """Until the queue is empty and no message of it waits for its acknowledgement."""
    deadline = time.monotonic() + timeout_s
    while client.llen(queue) or any(queue in v for v in client.hvals(UNACKED_KEY)):
        if time.monotonic() > deadline:
            raise SystemExit("the worker did not drain the queue in time")
        time.sleep(0.05)


def _run(client: redis.Redis, enqueuer: Enqueuer, queue: str, pid: int, tasks: int) -> dict:
    items = [Enqueue(str(uuid.uuid4()), queue) for _ in range(tasks)]
    commands, cpu, started = _commands(client), _cpu_s(pid), time.perf_counter()
    enqueuer.enqueue(client, items)
    _drained(client, queue)
    cpu_s, wall_s = _cpu_s(pid) - cpu, time.perf_counter() - started
    # Less this loop's own: its LLEN and HVALS every 50 ms, the enqueue, INFO.
    sent = _commands(client) - commands - tasks - 2 * round(wall_s / 0.05) - 3
    client.zrem(ENQUEUED_KEY, *(item.job_id for item in items))  # no job behind these
    return {
        "tasks": tasks,
        "cpu_s": round(cpu_s, 3),
        "wall_s": round(wall_s, 2),
        "cpu_ms_per_task": round(cpu_s / tasks * 1000, 3),
        "redis_commands_per_task": round(sent / tasks, 2),
    }


@click.command()
@click.option("--redis-url", default=None, help="Redis URL (else an embedded one)")
@click.option("--tasks", default=2000, show_default=True)
@click.option("--concurrency", default=64, show_default=True)
@click.option("--repeat", default=2, show_default=True)
def main(redis_url: str | None, tasks: int, concurrency: int, repeat: int) -> None:
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_or_embedded(redis_url))
        queue = f"inferq.consumer-bench-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, "INFERQ_REDIS_URL": redis_url}
        # As `inferq worker` runs Celery, on this module's app.
        args = ["-m", "celery", "-A", "bench.consumer:app", *celery_args(queue, concurrency)]
        worker = Child.spawn("consumer-bench", args, env, DEVNULL)
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        enqueuer = Enqueuer(make_producer_app(Settings(redis_url=redis_url)))
        try:
            time.sleep(3)  # the worker connects
            _run(client, enqueuer, queue, worker.pid, WARM_TASKS)
            for _ in range(repeat):
                click.echo(json.dumps(_run(client, enqueuer, queue, worker.pid, tasks)))
        finally:
            worker.stop()
            enqueuer.close()
            # The queue, and kombu's record of its binding (the worker declared it).
            client.delete(queue, *client.keys(f"_kombu.binding*.{queue}"))
            client.close()


if __name__ == "__main__":
    main()
