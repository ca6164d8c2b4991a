"""Stopping a generation that is not reading tokens: cancelled, past its deadline, or shut down.

The token loop reads the cancel flag at each flush, which costs nothing extra but acts only
when a token arrives. A generation also waits where no token comes: the backend's prefill
(its HTTP read is blocked) and the back-off between backend tries. One thread per worker
process watches the jobs it runs (their cancel flags in one Redis read, their deadlines, the
process's shutdown) and interrupts a waiting generation: its back-off wakes, and its backend
stream is aborted, which fails the blocked read at once and frees the backend's slot.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Any, Protocol

from redis import Redis

from inferq.events import cancel_key

log = logging.getLogger("inferq.worker")


class Reason(enum.StrEnum):
    cancelled = "cancelled"
    deadline = "deadline"
    shutdown = "shutdown"


class Abortable(Protocol):
    def abort(self) -> None: ...


class Interrupted(Exception):
    """Raised in the generation's thread once its interrupt is set (cancel, shutdown)."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class Interrupt:
    """One generation's stop signal, set by the watcher and read by the generation."""

    def __init__(self, job_id: str, deadline: float) -> None:
        self.job_id = job_id
        self.deadline = deadline  # time.monotonic() by which the whole run must end
        self.reason: Reason | None = None
        self._woken = threading.Event()
        self._lock = threading.Lock()
        self._stream: Abortable | None = None

    def set(self, reason: Reason) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            stream = self._stream
        self._woken.set()
        if stream is not None:
            _abort(stream)

    def attach(self, stream: Abortable | None) -> None:
        """The backend stream to abort if set (None: the stream ended)."""
        with self._lock:
            self._stream = stream
            reason = self.reason
        if stream is not None and reason is not None:
            _abort(stream)

    def sleep(self, seconds: float) -> None:
        """A back-off that an interrupt cuts short (tenacity's `sleep`)."""
        self._woken.wait(seconds)


def _abort(stream: Abortable) -> None:
    try:
        stream.abort()
    except Exception:
        log.exception("could not abort a backend stream")


class InterruptWatch:
    """The worker process's watcher over the interrupts of the generations it runs."""

    def __init__(self, redis: Redis, poll_seconds: float, grace_seconds: float) -> None:
        self._redis = redis
        self._poll = poll_seconds
        self._grace = grace_seconds
        self._running: dict[str, Interrupt] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._release_at: float | None = None  # set once the process is told to shut down

    @property
    def shutting_down(self) -> bool:
        return self._release_at is not None

    def start(self) -> None:
        threading.Thread(target=self._loop, name="inferq-interrupts", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def shut_down(self) -> None:
        """Take no new job; interrupt the running ones after the grace period.

        Called from a signal handler: it only stores a time, the watcher does the rest.
        """
        if self._release_at is None:
            self._release_at = time.monotonic() + self._grace

    def watch(self, interrupt: Interrupt) -> None:
        with self._lock:
            self._running[interrupt.job_id] = interrupt

    def forget(self, interrupt: Interrupt) -> None:
        with self._lock:
            if self._running.get(interrupt.job_id) is interrupt:
                del self._running[interrupt.job_id]

    def poll(self) -> None:
        """One look at every running generation."""
        with self._lock:
            running = list(self._running.values())
        if not running:
            return
        now = time.monotonic()
        if self._release_at is not None and now >= self._release_at:
            for interrupt in running:
                interrupt.set(Reason.shutdown)
        for interrupt in running:
            if now >= interrupt.deadline:
                interrupt.set(Reason.deadline)
        flags: list[Any] = self._redis.mget([cancel_key(i.job_id) for i in running])
        for interrupt, flag in zip(running, flags, strict=True):
            if flag is not None:
                interrupt.set(Reason.cancelled)

    def _loop(self) -> None:
        while not self._stop.wait(self._poll):
            try:
                self.poll()
            except Exception:
                log.exception("watching for interrupts failed; retrying")
