"""A running `inferq up`, recorded in its data directory so that other commands find it.

`inferq keys create`, `inferq submit`, `inferq migrate` and the rest, run from the project
while `inferq up` runs, reach its embedded Postgres and Redis and its API without any
INFERQ_* variable: the variables a user sets always win.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

RECORD = "instance.json"
DEFAULT_DATA_DIR = ".inferq"


@dataclass(frozen=True)
class Instance:
    pid: int
    api_url: str
    database_url: str
    redis_url: str
    models_file: str
    data_dir: str

    def alive(self) -> bool:
        return bool(psutil.pid_exists(self.pid))

    def dev_key(self) -> str | None:
        path = Path(self.data_dir) / "dev-api-key"
        return path.read_text().strip() if path.exists() else None


def data_dir() -> Path:
    return Path(os.environ.get("INFERQ_DATA_DIR") or DEFAULT_DATA_DIR)


def record(instance: Instance) -> None:
    path = Path(instance.data_dir) / RECORD
    path.write_text(json.dumps(asdict(instance), indent=2))
    path.chmod(0o600)


def forget(directory: Path) -> None:
    (directory / RECORD).unlink(missing_ok=True)


def find(directory: Path) -> Instance | None:
    """The instance running from `directory`, if one is."""
    try:
        instance = Instance(**json.loads((directory / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return instance if instance.alive() else None


def adopt(directory: Path) -> Instance | None:
    """Default this process's INFERQ_* connection settings to a running instance's."""
    instance = find(directory)
    if instance is not None:
        defaults = {
            "INFERQ_DATABASE_URL": instance.database_url,
            "INFERQ_REDIS_URL": instance.redis_url,
            "INFERQ_MODELS_FILE": instance.models_file,
            "INFERQ_API_URL": instance.api_url,
        }
        for name, value in defaults.items():
            if value:  # empty while the instance is still starting
                os.environ.setdefault(name, value)
        key = instance.dev_key()
        if key:
            os.environ.setdefault("INFERQ_API_KEY", key)
    return instance
