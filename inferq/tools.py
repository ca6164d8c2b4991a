"""The two tools beside the platform, `sim` and `bench`: found, never imported.

They live in the source tree and not in the wheel, so a production install carries neither.
`inferq sim` and `inferq bench` run them by module path (`python -m sim`), from wherever
Python finds them: on the import path, or in the checkout an editable install points at.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import inferq


@dataclass(frozen=True)
class Tool:
    module: str  # the top-level package, run as `python -m MODULE`
    title: str  # what a message calls it

    def missing(self, command: str | None = None) -> str:
        """The one line that says where the tool is, for a command that cannot find it."""
        return (
            f"{self.title} is part of inferq's source tree; "
            f"run `inferq {command or self.module}` from a checkout (make up installs it)"
        )


SIM = Tool("sim", "the simulator")
BENCH = Tool("bench", "the benchmark")


def source_tree() -> Path:
    """The directory above the installed `inferq` package: the checkout, when editable."""
    return Path(inferq.__file__).resolve().parent.parent


def environment(tool: Tool) -> dict[str, str] | None:
    """The environment in which `python -m MODULE` runs the tool; None when it is nowhere."""
    env = dict(os.environ)
    # find_spec on a top-level name locates the package without importing it.
    if importlib.util.find_spec(tool.module) is not None:
        return env
    source = source_tree()
    if not (source / tool.module / "__init__.py").is_file():
        return None
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), env.get("PYTHONPATH")) if p)
    return env
