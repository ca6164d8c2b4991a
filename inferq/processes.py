"""Child processes running inferq's own commands, each in a process group of its own.

`inferq up`, the benchmark and the test suite all start the platform the way an operator
would, one command per process; this is how they start, watch and stop them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class Child:
    role: str
    popen: subprocess.Popen[bytes]

    @classmethod
    def spawn(cls, role: str, args: list[str], env: dict[str, str], log: Path) -> Child:
        """Run `python -m inferq ARGS` (or `-m MODULE ...` when ARGS starts with "-m")."""
        command = args if args[:1] == ["-m"] else ["-m", "inferq", *args]
        with log.open("ab") as out:
            popen = subprocess.Popen(
                [sys.executable, *command],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(role, popen)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        if self.alive():
            os.killpg(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the whole group: no clean shutdown, no acknowledgements."""
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)

    def wait(self, deadline: float) -> None:
        """Wait for the end until `deadline` (monotonic), then kill the group."""
        try:
            self.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()

    def stop(self, timeout: float = 15.0) -> None:
        stop_all([self], timeout)


def stop_all(children: Iterable[Child], timeout: float = 15.0) -> None:
    """SIGTERM them all at once, then wait for each (SIGKILL past the timeout)."""
    children = list(children)
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout
    for child in children:
        child.wait(deadline)


def wait_http(url: str, child: Child | None = None, timeout: float = 60.0) -> None:
    """Return once `url` answers below 500; raise if the child exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.role} exited with {child.popen.returncode} (see its log)")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")
