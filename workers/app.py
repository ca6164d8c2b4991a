"""The Celery application: `celery -A workers.app worker|beat` (started by `inferq worker|beat`)."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any

from celery import Celery, signals
from prometheus_client import start_http_server

from inferq import metrics
from inferq.collector import quiet_collector
from inferq.logs import configure_worker_logging
from inferq.queue import GENERATE_TASK, celery_config
from inferq.settings import get_settings
from workers.context import WorkerContext
from workers.generate import run_job
from workers.judge import start_judge
from workers.retention import start_retention
from workers.stats import start_rollup
from workers.sweeper import start_sweeper
from workers.task_events import TaskEventsTogether
from workers.transport import register_json
from workers.webhooks import start_dispatcher

log = logging.getLogger("inferq.worker")


class InferqCelery(Celery):
    context: WorkerContext | None = None

    def require_context(self, threads: int = 8) -> WorkerContext:
        if self.context is None:
            self.context = WorkerContext.create(get_settings(), threads)
        return self.context


app = InferqCelery("inferq")
register_json()  # task bodies read by orjson where it reads them as kombu does
app.steps["consumer"].add(TaskEventsTogether)
app.conf.update(celery_config(get_settings()))
if get_settings().broker.startswith("redis://"):
    # kombu's Redis transport, made to survive a Redis restart under a connected consumer
    # (workers/transport.py): for the processes that consume through Celery (worker, beat,
    # Flower). rediss:// and unix:// keep kombu's own, which alone applies their TLS and
    # socket defaults.
    app.conf.broker_transport = "workers.transport:Transport"


@signals.setup_logging.connect
def _logging(**_: Any) -> None:
    # Connected, this replaces Celery's own set-up, which would hold every logger at the
    # command line's --loglevel and drop the job lines the workers log at INFO.
    configure_worker_logging(get_settings().log_level)


@signals.worker_init.connect
def _open(sender: Any = None, **_: Any) -> None:
    settings = get_settings()
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, registry=metrics.registry())
    threads = int(getattr(sender, "concurrency", None) or 8)
    app.require_context(threads).start(threads)
    quiet_collector()


@signals.worker_ready.connect
def _ready(sender: Any = None, **_: Any) -> None:
    _start_threads(getattr(sender, "pool", None))
    # Logged once logging is set up (worker_init comes before).
    if app.context is not None:
        where = "one event loop" if app.context.streams is not None else "their jobs' threads"
        log.info("backend streams read on %s", where)


def _start_threads(pool: Any) -> None:
    """Every thread of the threads pool, started now: its executor starts one a task until it
    has them all, and a fresh worker's first burst would wait for them."""
    executor: concurrent.futures.ThreadPoolExecutor | None = getattr(pool, "executor", None)
    if executor is None:  # not the threads pool
        return
    started = threading.Event()
    waits = [executor.submit(started.wait, 5) for _ in range(pool.limit)]
    started.set()
    concurrent.futures.wait(waits)


@signals.worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    # Celery's warm shutdown waits for running tasks however long they take; ours end within
    # the grace period, handing unfinished jobs to another worker (workers/interrupts.py).
    if app.context is not None:
        app.context.interrupts.shut_down()


@signals.worker_shutdown.connect
def _close(**_: Any) -> None:
    if app.context is not None:
        app.context.close()
        app.context = None


@app.task(name=GENERATE_TASK, ignore_result=True)
def generate(job_id: str) -> None:
    run_job(app.require_context(), job_id)


@signals.beat_init.connect
def _start_sweeper(**_: Any) -> None:
    settings = get_settings()
    if settings.beat_metrics_port:
        start_http_server(settings.beat_metrics_port, registry=metrics.registry())
    start_sweeper(app.require_context())
    start_dispatcher(app.require_context())
    start_judge(app.require_context())
    start_retention(app.require_context())
    start_rollup(app.require_context())
