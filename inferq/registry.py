"""The models file: which models clients may ask for, and where each one runs."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_core import ErrorDetails

from inferq.metrics import ROUTES
from inferq.protocol import JobInput
from inferq.routing import AUTO, JudgeTable, RoutingTable
from inferq.settings import Settings

DEFAULT_SIM_URL = "http://127.0.0.1:8081"
DEFAULT_QUEUE_PREFIX = "inferq"

T = TypeVar("T", bound=BaseModel)


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

    # A misspelt key must not silently fall back to its default.
    model_config = ConfigDict(extra="forbid")

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


# The tables a models file may hold.
TABLES = ("models", "routing", "judge")


def _where(table: str, loc: tuple[int | str, ...]) -> tuple[str, tuple[int | str, ...]]:
    """The TOML table an error is in, and the rest of its location."""
    if table == "routing" and len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        return f"[[routing.rules]] #{loc[1] + 1}", loc[2:]
    return f"[{table}]", loc


def _one_line(errors: list[ErrorDetails], table: str) -> str:
    """The first error as one line naming the key and its table; an unknown key first, since
    a misspelt key also leaves its right spelling missing."""
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where, loc = _where(table, tuple(error["loc"]))
    key = ".".join(str(part) for part in loc)
    if error["type"] == "extra_forbidden":
        return f"models file: unknown key {key!r} in {where}"
    if error["type"] == "missing":
        return f"models file: missing key {key!r} in {where}"
    if key:
        return f"models file: {key!r} in {where}: {error['msg']}"
    return f"models file: {where}: {error['msg']}"


def _section(data: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = data.get(name)
    if value is not None and not isinstance(value, dict):
        raise ModelsFileError(f"models file: {name!r} must be a table ([{name}])")
    return value


def _parse_models(entries: dict[str, Any]) -> list[ModelSpec]:
    models = []
    for name, spec in entries.items():
        table = f"models.{name}"
        if not isinstance(spec, dict):
            raise ModelsFileError(f"models file: [{table}] must be a table")
        if "name" in spec:  # the table's name is the model's
            raise ModelsFileError(f"models file: unknown key 'name' in [{table}]")
        try:
            models.append(ModelSpec(name=name, **spec))
        except ValidationError as exc:
            raise ModelsFileError(_one_line(exc.errors(), table)) from exc
    return models


def _parse_table(kind: type[T], data: dict[str, Any] | None, name: str) -> T | None:
    if data is None:
        return None
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise ModelsFileError(_one_line(exc.errors(), name)) from exc


class Registry:
    """The configured models by name, each with its queue under the deployment's prefix, and
    the [routing] and [judge] tables, each naming only configured models."""

    def __init__(
        self,
        models: list[ModelSpec],
        queue_prefix: str = DEFAULT_QUEUE_PREFIX,
        routing: RoutingTable | None = None,
        judge: JudgeTable | None = None,
    ) -> None:
        if not models:
            raise ModelsFileError("models file: no model (add a [models.NAME] table)")
        if any(m.name == AUTO for m in models):
            raise ModelsFileError(f"models file: {AUTO!r} is reserved for routing; rename it")
        self.queue_prefix = queue_prefix
        self._models = {
            m.name: m.model_copy(update={"queue": queue_name(queue_prefix, m.queue or m.name)})
            for m in models
        }
        self.routing = routing
        self.judge = judge
        self._check_named_models()

    def _check_named_models(self) -> None:
        named: list[tuple[str, str]] = []
        if self.routing is not None:
            named.append(("[routing] default", self.routing.default))
            named += [
                (f"[[routing.rules]] #{i} model", rule.model)
                for i, rule in enumerate(self.routing.rules, 1)
            ]
        if self.judge is not None:
            named.append(("[judge] model", self.judge.model))
        for where, name in named:
            if name not in self._models:
                configured = ", ".join(self._models)
                raise ModelsFileError(
                    f"models file: {where} {name!r} is not a configured model ({configured})"
                )

    def resolve(self, requested: str, job_input: JobInput) -> str:
        """The model a job asking for `requested` runs on: `auto` routed, any other as asked."""
        if requested != AUTO or self.routing is None:
            return requested
        target = self.routing.route(job_input)
        ROUTES.labels(target).inc()
        return target

    def serves(self, name: str) -> bool:
        """Whether a client may ask for `name`: a configured model, or `auto` when routed."""
        return name in self.offered()

    def offered(self) -> list[str]:
        """The names a client may ask for: the models, and `auto` when the file routes."""
        return self.names() + ([AUTO] if self.routing is not None else [])

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
        """The file's models and tables; anything it does not know is refused, in one line."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ModelsFileError(f"models file: not valid TOML: {exc}") from exc
        for key in data:
            if key not in TABLES:
                raise ModelsFileError(f"models file: unknown key {key!r} at the top level")
        models = _parse_models(_section(data, "models") or {})
        routing = _parse_table(RoutingTable, _section(data, "routing"), "routing")
        judge = _parse_table(JudgeTable, _section(data, "judge"), "judge")
        return cls(models, queue_prefix, routing, judge)

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
