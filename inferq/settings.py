"""One validated Settings object for every process, read from INFERQ_* variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # A refused value may sit beside a real secret: errors never echo the input.
    model_config = SettingsConfigDict(
        env_prefix="INFERQ_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    environment: Literal["development", "production", "test"] = "development"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/inferq"
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = None
    models_file: Path | None = None
    bootstrap_key: SecretStr | None = None

    # Delivery
    lease_seconds: float = 30.0
    max_attempts: int = 3
    backend_retries: int = 4
    backend_retry_base_seconds: float = 0.25
    backend_timeout_seconds: float = 60.0
    job_deadline_seconds: float = 600.0
    sweep_interval_seconds: float = 2.0
    lost_enqueue_grace_seconds: float = 5.0
    visibility_timeout_seconds: int = 3600

    # Token stream
    flush_interval_ms: float = 20.0  # while few streams run in the worker process
    flush_budget_per_second: float = 400.0  # per worker process; more streams flush less often
    flush_interval_max_ms: float = 100.0
    flush_max_tokens: int = 16
    # How a worker process reads its backend streams: all on one asyncio loop, their flushes
    # written together ("loop"), or each in its job's thread ("threads").
    worker_streams: Literal["loop", "threads"] = "loop"
    stream_maxlen: int = 100_000
    stream_ttl_seconds: int = 3600
    sse_ping_seconds: float = 15.0
    cancel_wait_seconds: float = 2.0

    # Input limits
    max_prompt_chars: int = 200_000
    max_messages: int = 1000

    # Flower
    flower_basic_auth: SecretStr = SecretStr("admin:inferq")

    # Grafana's read-only Postgres role (deploy/grafana): set, `inferq migrate` creates or
    # updates the role `grafana_reader` with this password after the migrations.
    grafana_db_password: SecretStr | None = None

    db_pool_size: int = 20
    redis_pool_size: int = 64
    worker_metrics_port: int | None = None  # serve the worker's /metrics on this port
    worker_db_connections: int = 16  # at most this many Postgres connections per worker
    log_level: str = "INFO"

    # Webhooks
    webhook_allow_private: bool = False  # allow URLs on private, loopback, link-local addresses
    webhook_timeout_seconds: float = 10.0  # a try that has no 2xx by then failed
    webhook_resolve_timeout_seconds: float = 5.0  # DNS lookup of the URL's host at submit
    webhook_retry_base_seconds: float = 5.0  # first back-off; doubles per try, with jitter
    webhook_retry_max_seconds: float = 3600.0
    webhook_retry_window_seconds: float = 86400.0  # after the job ends; then given up
    webhook_poll_seconds: float = 0.5  # how often beat looks for due deliveries
    webhook_concurrency: int = 16  # deliveries in flight at once
    beat_metrics_port: int | None = None  # serve beat's /metrics (webhook deliveries) here

    # Sweeper
    # Prefix of this deployment's queue names and sweeper keys in Redis, so that a worker of
    # another deployment on the same Redis never takes this one's messages. Unset, it is the
    # name of the database in database_url (see inferq.queue.queue_prefix).
    queue_prefix: str | None = None
    orphan_mark_seconds: float = 30.0  # a queued job marked enqueued this long ago is checked
    orphan_scan_interval_seconds: float = 60.0  # at most one scan of the queues per this
    stream_close_after_seconds: float = 5.0  # a job ended this long ago must have a closed stream

    # Worker faults
    # A claim with no progress (token, flush, retry back-off) for this long stops being renewed,
    # so its lease lapses and the job runs again. Unset: backend_timeout_seconds + 30, since a
    # silent backend is timed out by the client first; only a backend that keeps the connection
    # alive without sending tokens (keep-alives) reaches this bound. Keep it above the longest
    # wait for a first token in the backend's own queue.
    stall_seconds: float | None = None

    # Stopping early
    # How often a worker looks for cancelled jobs among those it runs, so that a cancel acts
    # while no token flows (a long prefill, a retry's back-off): one Redis read per process.
    cancel_poll_seconds: float = 0.15
    # On SIGTERM a worker takes no new job and lets running ones finish this long; it then
    # hands the rest back to the queue for another worker, which restarts them at once.
    shutdown_grace_seconds: float = 30.0

    # Event streams: how long a new SSE reader waits for its live subscription
    # while the API's pub/sub connection to Redis is being re-established; then a 503.
    sse_subscribe_timeout_seconds: float = 10.0

    # Redis outages: how long a worker keeps trying to publish a generation's
    # tokens while Redis is unreachable before it stops the attempt (its lease then lapses
    # and the job runs again); keep it below stall_bound_seconds.
    redis_outage_seconds: float = 30.0

    # Per-key limits: the length of the requests- and tokens-per-minute window
    # (60; shorter only for tests), and the Retry-After of a `queue_full` refusal (a queued
    # job of the key may start at any moment, so a short wait).
    limit_window_seconds: int = 60
    limit_queue_full_retry_seconds: int = 2

    # Response cache: how long a deterministic request's answer is served again.
    cache_ttl_seconds: int = 86400

    # The quality loop (docs/quality.md). Retention: beat clears the input and output texts
    # of jobs that ended this many days ago, keeping their counts, timings and cost.
    retention_days: float = Field(30.0, gt=0)
    retention_interval_seconds: float = 300.0  # how often beat looks for such jobs
    # How often beat rolls up closed days for /v1/stats (docs/stats.md).
    stats_rollup_seconds: float = Field(600.0, gt=0)
    # Clear a job's input text in the statement that ends it (read at submit: a job submitted
    # while this is on is redacted whichever process ends it).
    redact_inputs: bool = False
    judge_interval_seconds: float = 5.0  # how often beat samples ended jobs for the judge

    @property
    def stall_bound_seconds(self) -> float:
        return self.stall_seconds or self.backend_timeout_seconds + 30.0

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @model_validator(mode="after")
    def _broker_is_redis(self) -> Settings:
        if not self.broker.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("the broker must be Redis (redis://, rediss:// or unix://)")
        return self

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.environment == "production" and (names := default_secrets(self)):
            raise ValueError(
                f"{', '.join(names)}: a default or example secret; set a secret of your own"
                " in production (deploy/gen-env writes random ones)"
            )
        return self


# Secrets this repository ships as defaults or examples (settings, docker-compose, the
# Kubernetes example Secret) and the usual first guesses: anyone can read or try them.
_KNOWN_PASSWORDS = frozenset(
    {"", "inferq", "postgres", "redis", "admin", "password", "secret", "change-me", "changeme"}
)
_KNOWN_BOOTSTRAP_KEYS = _KNOWN_PASSWORDS | {
    "iq-compose-bootstrap-change-me",
    "change-me-to-a-long-random-admin-key",
}


def _url_password(url: str) -> str | None:
    password = urlsplit(url).password
    return None if password is None else unquote(password)


def default_secrets(settings: Settings) -> list[str]:
    """The variables whose secret is a known default (a URL without a password is not)."""
    found = []
    bootstrap = settings.bootstrap_key
    if bootstrap is not None and bootstrap.get_secret_value() in _KNOWN_BOOTSTRAP_KEYS:
        found.append("INFERQ_BOOTSTRAP_KEY")
    # Flower takes `user:password`, or several separated by commas.
    flower = settings.flower_basic_auth.get_secret_value().split(",")
    if any(pair.partition(":")[2] in _KNOWN_PASSWORDS for pair in flower):
        found.append("INFERQ_FLOWER_BASIC_AUTH")
    grafana = settings.grafana_db_password
    if grafana is not None and grafana.get_secret_value() in _KNOWN_PASSWORDS:
        found.append("INFERQ_GRAFANA_DB_PASSWORD")
    urls = {
        "INFERQ_DATABASE_URL": settings.database_url,
        "INFERQ_REDIS_URL": settings.redis_url,
        "INFERQ_BROKER_URL": settings.broker_url or "",
    }
    found += [name for name, url in urls.items() if _url_password(url) in _KNOWN_PASSWORDS]
    return found


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
