"""A Celery consumer step that sends a worker's task events together (workers.app adds it)."""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from kombu.common import ignore_errors

# Task events (what Flower shows: received, started, succeeded) wait this long in the
# worker's buffer, to go out together; past EVENTS_BUFFER of them they go at once.
EVENTS_FLUSH_S = 0.25
EVENTS_BUFFER = 1000


class TaskEventsTogether(bootsteps.StartStopStep):
    """The worker's task events sent every EVENTS_FLUSH_S, together.

    Celery buffers them, but flushes its buffer on the consumer's next turn: about once a
    task, a publish of its own (kombu's, then Redis's) for two or three events. Here the
    first event buffered schedules the flush a moment later; those buffered meanwhile go in
    the same message (`task.multi`, which Flower reads as it reads one event). The buffer is
    flushed too when the consumer stops, before its event dispatcher closes.
    """

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._due = False  # a flush is scheduled (two at once would only flush twice)

    def start(self, c: Any) -> None:
        dispatcher, hub = c.event_dispatcher, c.hub
        if dispatcher is None or hub is None or not dispatcher.buffer_group:
            return  # no buffer: Celery sends each event at once
        dispatcher.buffer_limit = EVENTS_BUFFER
        self._due = False

        def flush() -> None:
            self._due = False
            if c.event_dispatcher is dispatcher:
                dispatcher.flush()

        def buffered() -> None:  # from any thread
            if not self._due:
                self._due = True
                hub.call_soon(lambda: hub.call_later(EVENTS_FLUSH_S, flush))

        dispatcher.on_send_buffered = buffered

    def stop(self, c: Any) -> None:
        if c.event_dispatcher is not None:
            ignore_errors(c, c.event_dispatcher.flush)  # as Celery's own step closes it
