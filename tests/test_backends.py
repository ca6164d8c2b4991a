"""The backends as a worker uses them, against the simulator over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import Platform

STREAM = """
import sys
from inferq.registry import ModelSpec
from workers.backends import GenerationRequest, open_stream

spec = ModelSpec(name="sim", url=sys.argv[1])
stream = open_stream(spec, GenerationRequest(prompt="hello", messages=None, max_tokens=4), 30)
print("".join(stream))
"""


class _Recorder(BaseHTTPRequestHandler):
    paths: list[str] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[tuple[str, list[str]]]:
    """A stand-in for huggingface.co that records every request it gets."""
    paths: list[str] = []
    handler = type("Recorder", (_Recorder,), {"paths": paths})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", paths
    server.shutdown()
    server.server_close()


def test_a_worker_streams_without_calling_the_hub(
    platform: Platform, hub: tuple[str, list[str]], tmp_path: Path
) -> None:
    hub_url, requests_seen = hub
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": hub_url, "HF_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", STREAM, platform.sims["fast"].url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the stream gave no text"
    assert requests_seen == []


@pytest.mark.parametrize("backend", ["tgi", "openai"])
def test_a_backend_error_tells_what_happened_without_the_backends_address(
    platform: Platform, backend: str
) -> None:
    """The message is stored and shown to the tenant; the worker's log has the address."""
    from inferq.registry import ModelSpec
    from workers.backends import BackendError, GenerationRequest, open_stream

    url = f"{platform.sims['fast'].url}/no-such-route"
    spec = ModelSpec(name="misrouted", backend=backend, url=url)
    request = GenerationRequest(prompt="hello", messages=None, max_tokens=4)
    with pytest.raises(BackendError) as failure:
        "".join(open_stream(spec, request, 30))
    message = failure.value.message
    assert "404" in message
    assert "127.0.0.1" not in message and "http" not in message.lower(), message
