"""One validated Settings object for every process, read from INFERQ_* variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERQ_", env_file=".env", extra="ignore")

    environment: Literal["development", "production", "test"] = "development"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/inferq"
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = None
    models_file: Path | None = None
    bootstrap_key: SecretStr | None = None

    # Delivery (DESIGN §4)
    lease_seconds: float = 30.0
    max_attempts: int = 3
    backend_retries: int = 4
    backend_retry_base_seconds: float = 0.25
    backend_timeout_seconds: float = 60.0
    job_deadline_seconds: float = 600.0
    sweep_interval_seconds: float = 2.0
    lost_enqueue_grace_seconds: float = 5.0
    visibility_timeout_seconds: int = 3600

    # Token stream (DESIGN §5)
    flush_interval_ms: float = 20.0  # while few streams run in the worker process
    flush_budget_per_second: float = 400.0  # per worker process; more streams flush less often
    flush_interval_max_ms: float = 100.0
    flush_max_tokens: int = 16
    stream_maxlen: int = 100_000
    stream_ttl_seconds: int = 3600
    sse_ping_seconds: float = 15.0
    cancel_wait_seconds: float = 2.0

    # Input limits
    max_prompt_chars: int = 200_000
    max_messages: int = 1000

    # Flower
    flower_basic_auth: SecretStr = SecretStr("admin:inferq")

    db_pool_size: int = 20
    redis_pool_size: int = 64
    worker_metrics_port: int | None = None  # serve the worker's /metrics on this port
    worker_db_connections: int = 16  # at most this many Postgres connections per worker
    log_level: str = "INFO"

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
        if self.environment == "production" and self.flower_basic_auth.get_secret_value() == (
            "admin:inferq"
        ):
            raise ValueError("set INFERQ_FLOWER_BASIC_AUTH in production")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
