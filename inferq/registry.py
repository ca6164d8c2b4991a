"""The models file: which models clients may ask for, and where each one runs."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator

from inferq.settings import Settings

DEFAULT_SIM_URL = "http://127.0.0.1:8081"
DEFAULT_QUEUE_PREFIX = "inferq"


def queue_prefix_of(settings: Settings) -> str:
    """The prefix of a deployment's queue names: INFERQ_QUEUE_PREFIX, else its database's name.

    A deployment is its database: two deployments never share one (their jobs would mix), while
    they may well share a Redis. Queues named after the database keep each deployment's workers
    on its own messages with nothing to configure, and every process of a deployment agrees on
    the name however it reaches Postgres (host, port, pooler). The default database, `inferq`,
    keeps the `inferq.<model>` names. Deployments whose databases have one name on different
    servers, and share a Redis, set INFERQ_QUEUE_PREFIX.
    """
    database = urlsplit(settings.database_url).path.strip("/")
    return settings.queue_prefix or database or DEFAULT_QUEUE_PREFIX


def queue_name(prefix: str, base: str) -> str:
    return f"{prefix}.{base}"


class ModelSpec(BaseModel):
    """One servable model, as written in the models file."""

    name: str
    backend: Literal["tgi", "openai"] = "tgi"
    url: str
    upstream_model: str | None = None  # model name sent to an OpenAI-compatible server
    api_key_env: str | None = None  # name of the variable that holds the backend's key
    api_key: SecretStr | None = Field(None, exclude=True)  # read from it when the file loads
    queue: str = ""  # in the file: the name after the deployment's prefix (default: the model's)
    max_tokens: int = Field(512, gt=0)
    context_tokens: int = Field(4096, gt=0)
    price_input_per_mtok: float = Field(0.0, ge=0)
    price_output_per_mtok: float = Field(0.0, ge=0)

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, url: str) -> str:
        return url.rstrip("/")

    def model_post_init(self, _context: object) -> None:
        if self.api_key_env and self.api_key is None:
            secret = os.environ.get(self.api_key_env)
            self.api_key = SecretStr(secret) if secret else None

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (
            input_tokens * self.price_input_per_mtok + output_tokens * self.price_output_per_mtok
        ) / 1_000_000


class ModelsFileError(ValueError):
    """The models file is missing, unreadable or invalid."""


class Registry:
    """The configured models by name, each with its queue under the deployment's prefix."""

    def __init__(self, models: list[ModelSpec], queue_prefix: str = DEFAULT_QUEUE_PREFIX) -> None:
        if not models:
            raise ModelsFileError("the models file names no model")
        self.queue_prefix = queue_prefix
        self._models = {
            m.name: m.model_copy(update={"queue": queue_name(queue_prefix, m.queue or m.name)})
            for m in models
        }

    def get(self, name: str) -> ModelSpec | None:
        return self._models.get(name)

    def queue_of(self, name: str) -> str:
        """The queue a job for `name` goes to (a model since removed keeps its default)."""
        spec = self._models.get(name)
        return spec.queue if spec else queue_name(self.queue_prefix, name)

    def names(self) -> list[str]:
        return list(self._models)

    def all(self) -> list[ModelSpec]:
        return list(self._models.values())

    @classmethod
    def from_toml(cls, text: str, queue_prefix: str = DEFAULT_QUEUE_PREFIX) -> Registry:
        try:
            data = tomllib.loads(text)
            entries = data.get("models", {})
            models = [ModelSpec(name=name, **spec) for name, spec in entries.items()]
            return cls(models, queue_prefix)
        except (tomllib.TOMLDecodeError, ValidationError, TypeError) as exc:
            raise ModelsFileError(f"invalid models file: {exc}") from exc

    @classmethod
    def load(
        cls,
        path: Path | None,
        sim_url: str = DEFAULT_SIM_URL,
        queue_prefix: str = DEFAULT_QUEUE_PREFIX,
    ) -> Registry:
        """The models file at `path`, or one model `sim` on the local simulator."""
        prefix = queue_prefix
        if path is None:
            return cls([ModelSpec(name="sim", backend="tgi", url=sim_url)], prefix)
        try:
            return cls.from_toml(Path(path).read_text(), prefix)
        except OSError as exc:
            raise ModelsFileError(f"cannot read models file {path}: {exc}") from exc


def registry_of(settings: Settings) -> Registry:
    """The deployment's models, their queues named under its prefix."""
    return Registry.load(settings.models_file, queue_prefix=queue_prefix_of(settings))
