"""beat's own /metrics, run as docker compose runs it.

In compose and Kubernetes every process is scraped on its own: what beat counts (the
sweeper's last pass, the judge's scores and verdicts, retention, webhook deliveries) is on
beat's /metrics, at INFERQ_BEAT_METRICS_PORT. Here beat runs with the compose service's
command and production settings against its own database (so its own queues and sweeper
keys in Redis), and its /metrics is read as Prometheus reads it.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from inferq.migrate import upgrade
from tests.servers import Child, Databases, create_database, drop_database, free_port, wait_http

COMPOSE_FILE = Path(__file__).resolve().parents[1] / "docker-compose.yml"
# What beat's /metrics carries from its start (the sweeper's gauge once it has swept).
BEAT_FAMILIES = {
    "inferq_sweeper_last_run_timestamp_seconds",
    "inferq_judge_score",
    "inferq_judge_verdicts",
    "inferq_retention_cleared_jobs",
    "inferq_webhook_deliveries",
}


def compose_beat() -> dict[str, Any]:
    with COMPOSE_FILE.open() as f:
        return dict(yaml.safe_load(f)["services"]["beat"])


def scrape(url: str) -> dict[str, list[float]]:
    """Each metric family on `url`, with its samples' values."""
    text = httpx.get(url, timeout=10).text
    return {f.name: [s.value for s in f.samples] for f in text_string_to_metric_families(text)}


def last_pass(url: str) -> float:
    (value,) = scrape(url)["inferq_sweeper_last_run_timestamp_seconds"]
    return value


def eventually(check: Any, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def beat_metrics(databases: Databases, tmp_path: Path) -> Iterator[str]:
    """beat, started with compose's command and settings; the URL of its /metrics."""
    service = compose_beat()
    database_url, name = create_database(databases.admin_url)
    upgrade(database_url)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env |= {
        # compose's INFERQ_ENVIRONMENT default: the secrets must not be default ones.
        "INFERQ_ENVIRONMENT": "production",
        "INFERQ_DATABASE_URL": database_url,
        "INFERQ_REDIS_URL": databases.redis_url,
        "INFERQ_BOOTSTRAP_KEY": f"iq_bootstrap_{secrets.token_urlsafe(32)}",
        "INFERQ_FLOWER_BASIC_AUTH": f"admin:{secrets.token_urlsafe(32)}",
        "INFERQ_BEAT_METRICS_PORT": str(port),
        "INFERQ_DATA_DIR": str(tmp_path),  # where `inferq beat` keeps its schedule file
        "INFERQ_SWEEP_INTERVAL_SECONDS": "0.3",
    }
    beat = Child.spawn("beat-metrics", service["command"], env, tmp_path / "beat.log")
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_http(url, beat)
        yield url
    finally:
        beat.stop()
        drop_database(databases.admin_url, name)


def test_compose_runs_beat_with_a_metrics_port() -> None:
    service = compose_beat()
    port = service["environment"]["INFERQ_BEAT_METRICS_PORT"]
    assert service["command"] == ["beat"]
    assert [str(p) for p in service["expose"]] == [port]


def test_beat_metrics_answer_with_the_sweepers_last_pass(beat_metrics: str) -> None:
    started = time.time()
    families = scrape(beat_metrics)
    assert families.keys() >= BEAT_FAMILIES, BEAT_FAMILIES - families.keys()
    # Its own sweeper sets it after each pass: on this fresh deployment nothing else could.
    eventually(lambda: last_pass(beat_metrics) > 0, "beat's sweeper never reported a pass")
    first = last_pass(beat_metrics)
    assert started - 5 < first <= time.time() + 1
    eventually(lambda: last_pass(beat_metrics) > first, "the sweeper's last pass stays put")
