"""`inferq worker --processes N`: N Celery nodes side by side, one process each.

One worker process relays a few thousand tokens a second on one core (its Python holds one
core at most), so a host with more cores and more streams runs several. Each is a complete,
independent Celery node with its own threads, leases, interrupt watcher and connections:
acks-late, claims, leases, cancellation and the hand-back at shutdown are each node's own,
exactly as with one process. This parent only starts them, passes a stop signal on, and
ends when they have: when one node ends on its own, the others are stopped too, so that a
supervisor (compose, Kubernetes) sees the worker exit and restarts it whole.

The nodes stay in this process's group: a signal to the group (a terminal's Ctrl-C, a
`kill -9` of the group) reaches every node directly. A stop signal sent to this process alone
is passed on as SIGTERM, Celery's warm shutdown, which a node may receive twice harmlessly.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from types import FrameType

# Streams one process carries comfortably (docs/performance.md): the default process count
# grows with the concurrency asked for, up to the cores this process may use.
STREAMS_PER_PROCESS = 32


def celery_args(queues: str, concurrency: int) -> list[str]:
    """`celery worker`'s arguments for one node of `inferq worker` (and of bench.consumer,
    which must run the same)."""
    return [
        "worker",
        "-P",
        "threads",
        "-c",
        str(concurrency),
        "-Q",
        queues,
        "-E",
        "--without-mingle",
        "--loglevel",
        "WARNING",
    ]


def default_processes(concurrency: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, math.ceil(concurrency / STREAMS_PER_PROCESS)))


def split(concurrency: int, processes: int) -> list[int]:
    """Each node's threads: `concurrency` shared out, every node at least one."""
    base, extra = divmod(max(concurrency, processes), processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


def node_names(name: str | None, processes: int) -> list[str]:
    """The first node keeps the given name; the others add `-2`, `-3`… to its first part.

    Without a name Celery's default (celery@host) would repeat, so each gets `inferq-N@host`.
    """
    if name is None:
        return [f"inferq-{i + 1}@%h" for i in range(processes)]
    node, at, host = name.partition("@")
    return [name] + [f"{node}-{i + 1}{at}{host}" for i in range(1, processes)]


def node_env(index: int) -> dict[str, str]:
    """Node `index`'s environment: each serves its /metrics on a port of its own, the
    configured one plus its index (INFERQ_WORKER_METRICS_PORT, when set)."""
    env = dict(os.environ)
    port = env.get(METRICS_PORT)
    if port and port.strip().isdigit() and int(port) > 0:
        env[METRICS_PORT] = str(int(port) + index)
    return env


METRICS_PORT = "INFERQ_WORKER_METRICS_PORT"


def run_nodes(commands: list[list[str]]) -> int:
    """Run `python -m celery ARGS` for each command; return the exit code of the first to end."""
    children = [
        subprocess.Popen([sys.executable, "-m", "celery", *args], env=node_env(i))
        for i, args in enumerate(commands)
    ]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    first: int | None = None
    while any(child.poll() is None for child in children):
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        code = os.waitstatus_to_exitcode(status)
        for child in children:
            if child.pid == pid:
                child.returncode = code
        if first is None:
            first = code
            if not stopping:  # a node ended on its own: end the worker
                stop(signal.SIGTERM, None)
    code = first or 0
    return code if code >= 0 else 128 - code  # killed by a signal: as a shell says it
