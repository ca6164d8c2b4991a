"""What a worker logs: its job lines, without Celery's lines that repeat them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from inferq.logs import PER_TASK_LOGGERS, configure_worker_logging


@pytest.fixture(autouse=True)
def restored() -> Iterator[None]:
    """The logging set-up as it was, afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in PER_TASK_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, held in levels.items():
        logging.getLogger(name).setLevel(held)


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def _log_a_task() -> None:
    logging.getLogger("celery.worker.strategy").info("Task inferq.generate[j1] received")
    logging.getLogger("inferq.worker").info("job j1 started on sim", extra={"job_id": "j1"})
    logging.getLogger("celery.app.trace").info("Task inferq.generate[j1] succeeded in 0.1s")
    logging.getLogger("celery.app.trace").error("Task inferq.generate[j2] raised unexpected")


def test_a_worker_logs_its_job_lines_and_not_celerys_that_repeat_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_worker_logging("INFO")
    _log_a_task()
    lines = _lines(capsys)
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("inferq.worker", "INFO"),
        ("celery.app.trace", "ERROR"),  # a task that raised is still logged
    ]
    assert lines[0]["job_id"] == "j1"


def test_at_debug_a_worker_logs_celerys_lines_too(capsys: pytest.CaptureFixture[str]) -> None:
    configure_worker_logging("DEBUG")
    _log_a_task()
    assert [line["logger"] for line in _lines(capsys)] == [
        "celery.worker.strategy",
        "inferq.worker",
        "celery.app.trace",
        "celery.app.trace",
    ]
