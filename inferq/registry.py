"""The models file: which models clients may ask for, and where each one runs."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator

DEFAULT_SIM_URL = "http://127.0.0.1:8081"


def default_queue(model: str) -> str:
    return f"inferq.{model}"


class ModelSpec(BaseModel):
    """One servable model, as written in the models file."""

    name: str
    backend: Literal["tgi", "openai"] = "tgi"
    url: str
    upstream_model: str | None = None  # model name sent to an OpenAI-compatible server
    api_key_env: str | None = None  # name of the variable that holds the backend's key
    api_key: SecretStr | None = Field(None, exclude=True)  # read from it when the file loads
    queue: str = ""
    max_tokens: int = Field(512, gt=0)
    context_tokens: int = Field(4096, gt=0)
    price_input_per_mtok: float = Field(0.0, ge=0)
    price_output_per_mtok: float = Field(0.0, ge=0)

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, url: str) -> str:
        return url.rstrip("/")

    def model_post_init(self, _context: object) -> None:
        if not self.queue:
            self.queue = default_queue(self.name)
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
    """The configured models by name."""

    def __init__(self, models: list[ModelSpec]) -> None:
        if not models:
            raise ModelsFileError("the models file names no model")
        self._models = {m.name: m for m in models}

    def get(self, name: str) -> ModelSpec | None:
        return self._models.get(name)

    def queue_of(self, name: str) -> str:
        """The queue a job for `name` goes to (a model since removed keeps its default)."""
        spec = self._models.get(name)
        return spec.queue if spec else default_queue(name)

    def names(self) -> list[str]:
        return list(self._models)

    def all(self) -> list[ModelSpec]:
        return list(self._models.values())

    @classmethod
    def from_toml(cls, text: str) -> Registry:
        try:
            data = tomllib.loads(text)
            entries = data.get("models", {})
            return cls([ModelSpec(name=name, **spec) for name, spec in entries.items()])
        except (tomllib.TOMLDecodeError, ValidationError, TypeError) as exc:
            raise ModelsFileError(f"invalid models file: {exc}") from exc

    @classmethod
    def load(cls, path: Path | None, sim_url: str = DEFAULT_SIM_URL) -> Registry:
        """The models file at `path`, or one model `sim` on the local simulator."""
        if path is None:
            return cls([ModelSpec(name="sim", backend="tgi", url=sim_url)])
        try:
            return cls.from_toml(Path(path).read_text())
        except OSError as exc:
            raise ModelsFileError(f"cannot read models file {path}: {exc}") from exc
