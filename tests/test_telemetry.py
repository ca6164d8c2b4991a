"""Hugging Face telemetry is off in every inferq process, whatever it starts from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each process imports first: the CLI (`inferq …`), the API app, the worker's Celery
# app, the bench (`python -m bench`), and the package itself.
ENTRIES = ["inferq.cli", "api.main", "workers.app", "bench", "bench.__main__", "inferq"]

PROBE = """
import importlib, json, os, sys
importlib.import_module(sys.argv[1])
import huggingface_hub.constants as constants
print(json.dumps({
    "env": os.environ.get("HF_HUB_DISABLE_TELEMETRY"),
    "constant": constants.HF_HUB_DISABLE_TELEMETRY,
}))
"""


def _probe(module: str, **env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "INFERQ_"))}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, module],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize("module", ENTRIES)
def test_entry_module_turns_hub_telemetry_off_before_the_library_loads(module: str) -> None:
    assert _probe(module) == {"env": "1", "constant": True}


def test_an_operator_can_turn_telemetry_back_on() -> None:
    assert _probe("inferq.cli", HF_HUB_DISABLE_TELEMETRY="0") == {"env": "0", "constant": False}
