"""Structured JSON logs; a record's `job_id` (and other extras) become fields."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# Celery's line for each task received and each task that succeeded: a worker's job lines
# (started, and how it ended) say the same with the job's fields.
PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def configure_worker_logging(level: str = "INFO") -> None:
    """As `configure_logging`, with Celery's per-task lines left out below DEBUG (and with
    them its INFO line for a task retried). A task rejected or that raised is still logged,
    at WARNING or ERROR."""
    configure_logging(level)
    held = logging.WARNING if logging.getLevelName(level) != logging.DEBUG else logging.NOTSET
    for name in PER_TASK_LOGGERS:
        logging.getLogger(name).setLevel(held)
