"""The machine and software a result was measured on."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil

from bench.servers import DataServers

PACKAGES = (
    "inferq",
    "fastapi",
    "uvicorn",
    "sse-starlette",
    "celery",
    "kombu",
    "redis",
    "sqlalchemy",
    "asyncpg",
    "psycopg",
    "huggingface_hub",
    "httpx",
    "httpx-sse",
)


@dataclass(frozen=True)
class Environment:
    cpu_count: int
    cpu_physical: int | None
    cpu_model: str
    memory_gib: float
    os: str
    python: str
    git_commit: str | None
    packages: dict[str, str]
    postgres: str
    redis: str
    embedded_servers: bool

    @classmethod
    def capture(cls, servers: DataServers) -> Environment:
        return cls(
            cpu_count=os.cpu_count() or 0,
            cpu_physical=psutil.cpu_count(logical=False),
            cpu_model=_cpu_model(),
            memory_gib=round(psutil.virtual_memory().total / 2**30, 1),
            os=platform.platform(),
            python=platform.python_version(),
            git_commit=_git_commit(),
            packages={name: _version(name) for name in PACKAGES},
            postgres=servers.postgres_version,
            redis=servers.redis_version,
            embedded_servers=servers.embedded,
        )


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    """The checkout's commit, with `+dirty` when it has local changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None
