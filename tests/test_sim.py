"""`inferq sim` over real HTTP: TGI shapes, huggingface_hub compatibility, faults, cancellation."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from huggingface_hub import ChatCompletionInputStreamOptions, InferenceClient
from huggingface_hub.errors import (
    GenerationError,
    IncompleteGenerationError,
    OverloadedError,
    UnknownError,
    ValidationError,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "the quick brown fox"
MESSAGES = [{"role": "user", "content": "Say something."}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sim exited early with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError("sim did not become healthy")


def _run_sim(*flags: str) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "sim", "--port", str(port), *flags]
    # The sim logs to stderr; a file, unlike a pipe, never fills up and blocks it.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def sim_server() -> Iterator[str]:
    """A simulator with default settings (ttft 50 ms, itl 20 ms)."""
    yield from _run_sim()


@pytest.fixture(scope="module")
def small_server() -> Iterator[str]:
    """A fast simulator with two slots and fixed-length output."""
    yield from _run_sim(
        "--max-concurrent-requests", "2", "--fixed-output-tokens", "7", "--itl-ms", "5"
    )


@pytest.fixture
def sim(sim_server: str) -> Iterator[str]:
    """The default simulator, with no faults scheduled before or after the test."""
    httpx.delete(f"{sim_server}/sim/faults")
    yield sim_server
    httpx.delete(f"{sim_server}/sim/faults")


@pytest.fixture
def client(sim: str) -> Iterator[InferenceClient]:
    with InferenceClient(model=sim, api_key="x", timeout=30) as hf:
        yield hf


def _state(url: str) -> dict[str, int]:
    return httpx.get(f"{url}/sim/state").json()


def _wait_idle(url: str, timeout_s: float = 1.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while (state := _state(url))["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return state


def _sse(response: httpx.Response) -> list[object]:
    """Decoded `data:` payloads of an SSE response (`[DONE]` stays a string)."""
    events: list[object] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _schedule(url: str, mode: str, count: int | None = 1) -> None:
    httpx.post(f"{url}/sim/faults", json={"mode": mode, "count": count}).raise_for_status()


# --- text generation through huggingface_hub ------------------------------------------


def test_stream_tokens_concatenate_to_generated_text(client: InferenceClient) -> None:
    events = list(
        client.text_generation(
            PROMPT, max_new_tokens=20, stream=True, details=True, return_full_text=False, seed=1
        )
    )
    last, details = events[-1], events[-1].details
    text = "".join(e.token.text for e in events if not e.token.special)
    assert text == last.generated_text
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert [e.index for e in events] == list(range(1, len(events) + 1))
    assert details is not None
    assert details.generated_tokens == len(events) <= 20
    assert details.input_length == 4
    assert details.finish_reason in {"length", "eos_token"}
    if details.finish_reason == "eos_token":
        assert last.token.special and last.token.text == "</s>"


def test_generate_details_match_stream(client: InferenceClient) -> None:
    output = client.text_generation(PROMPT, max_new_tokens=12, details=True, seed=5)
    streamed = list(
        client.text_generation(PROMPT, max_new_tokens=12, stream=True, details=True, seed=5)
    )
    details = output.details
    assert details is not None
    assert output.generated_text.startswith(PROMPT)  # `/` defaults return_full_text to true
    assert output.generated_text == streamed[-1].generated_text
    assert details.generated_tokens == len(details.tokens) == len(streamed)
    assert [t.text for t in details.tokens] == [e.token.text for e in streamed]


def test_same_prompt_and_seed_give_the_same_output(client: InferenceClient) -> None:
    def run(seed: int) -> str:
        return client.text_generation(
            PROMPT, max_new_tokens=10, seed=seed, do_sample=True, return_full_text=False
        )

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_fixed_output_tokens_and_max_new_tokens_cap(small_server: str) -> None:
    with InferenceClient(model=small_server, api_key="x", timeout=30) as hf:
        fixed = hf.text_generation(PROMPT, max_new_tokens=50, details=True)
        capped = hf.text_generation(PROMPT, max_new_tokens=3, details=True)
    assert fixed.details is not None and capped.details is not None
    assert (fixed.details.generated_tokens, fixed.details.finish_reason) == (7, "eos_token")
    assert (capped.details.generated_tokens, capped.details.finish_reason) == (3, "length")


def test_stop_sequence_ends_generation(client: InferenceClient) -> None:
    full = client.text_generation(PROMPT, max_new_tokens=20, return_full_text=False, seed=3)
    stop = full.split()[2]
    cut = client.text_generation(
        PROMPT, max_new_tokens=20, return_full_text=False, seed=3, stop=[stop], details=True
    )
    assert cut.details is not None
    assert cut.details.finish_reason == "stop_sequence"
    assert cut.generated_text.endswith(stop)
    assert full.startswith(cut.generated_text)


def test_generate_route_shapes_and_headers(sim: str) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "details": True, "seed": 7}}
    response = httpx.post(f"{sim}/generate", json=body, timeout=10)
    payload = response.json()
    assert response.status_code == 200
    assert not payload["generated_text"].startswith(PROMPT)  # /generate: return_full_text false
    assert response.headers["x-prompt-tokens"] == "4"
    assert response.headers["x-generated-tokens"] == str(payload["details"]["generated_tokens"])
    assert payload["details"]["seed"] is None  # greedy: TGI reports no seed
    assert list(payload["details"]) == [
        "finish_reason",
        "generated_tokens",
        "seed",
        "prefill",
        "tokens",
    ]


def test_generate_stream_wire_format(sim: str) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
    with httpx.stream("POST", f"{sim}/generate_stream", json=body, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        raw = response.read().decode()
    assert raw.startswith("data: {")
    assert "[DONE]" not in raw
    events = [json.loads(chunk.removeprefix("data: ")) for chunk in raw.strip().split("\n\n")]
    assert list(events[0]) == ["index", "token", "generated_text", "details"]
    assert events[-1]["generated_text"] is not None and events[-1]["details"] is None


# --- chat ---------------------------------------------------------------------------------


def test_chat_completion_stream_matches_non_stream(client: InferenceClient) -> None:
    whole = client.chat_completion(MESSAGES, max_tokens=12, seed=4)
    chunks = list(
        client.chat_completion(
            MESSAGES,
            max_tokens=12,
            seed=4,
            stream=True,
            stream_options=ChatCompletionInputStreamOptions(include_usage=True),
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert whole.choices[0].finish_reason in {"stop", "length"}
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.total_tokens == whole.usage.total_tokens
    assert whole.usage.completion_tokens <= 12


def test_chat_temperature_zero_is_greedy(sim: str) -> None:
    body = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0}
    response = httpx.post(f"{sim}/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200
    assert response.json()["object"] == "chat.completion"


def test_chat_stream_error_event_then_done(sim: str) -> None:
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True, "top_p": 1.0}
    with httpx.stream("POST", f"{sim}/v1/chat/completions", json=body, timeout=10) as response:
        events = _sse(response)
    assert response.status_code == 200
    assert events == [
        {
            "error": {
                "message": "Input validation error: `top_p` must be > 0.0 and < 1.0",
                "http_status_code": 422,
            }
        },
        "[DONE]",
    ]


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": 0}, "`temperature` must be strictly positive"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences"),
        ({"max_new_tokens": 9000}, "`inputs` tokens + `max_new_tokens` must be <= 8192"),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_invalid_parameters_raise_validation_error(
    client: InferenceClient, params: dict[str, Any], message: str, stream: bool
) -> None:
    params = {"max_new_tokens": 5, **params}
    with pytest.raises(ValidationError, match=re.escape(f"Input validation error: {message}")):
        result = client.text_generation(PROMPT, stream=stream, **params)
        if stream:
            list(result)


def test_stream_validation_error_is_one_event_in_http_200(sim: str) -> None:
    body = {"inputs": PROMPT, "parameters": {"temperature": 0, "max_new_tokens": 5}}
    with httpx.stream("POST", f"{sim}/generate_stream", json=body, timeout=10) as response:
        events = _sse(response)
    assert response.status_code == 200
    assert events == [
        {
            "error": "Input validation error: `temperature` must be strictly positive",
            "error_type": "validation",
        }
    ]


def test_non_stream_validation_error_is_http_422(sim: str) -> None:
    body = {"inputs": PROMPT, "parameters": {"temperature": 0}}
    response = httpx.post(f"{sim}/generate", json=body)
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        ('{"inputs": ', "application/json", 400),
        ('{"prompt": "x"}', "application/json", 422),
        ('{"inputs": "x"}', "text/plain", 415),
    ],
)
def test_malformed_bodies_are_rejected_in_plain_text(
    sim: str, content: str, content_type: str, status: int
) -> None:
    response = httpx.post(
        f"{sim}/generate", content=content, headers={"content-type": content_type}
    )
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/plain")


# --- overload and faults ----------------------------------------------------------------------


def test_overloaded_past_max_concurrent_requests(small_server: str) -> None:
    hold = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5}}
    stall = {"X-Sim-Error": "stall", "X-Sim-Stall-Ms": "10000"}
    with (
        httpx.Client(timeout=30) as raw,
        InferenceClient(model=small_server, api_key="x", timeout=30) as hf,
    ):
        with (
            raw.stream("POST", f"{small_server}/generate_stream", json=hold, headers=stall),
            raw.stream("POST", f"{small_server}/generate_stream", json=hold, headers=stall),
        ):
            assert _state(small_server)["active"] == 2
            with pytest.raises(OverloadedError, match="Model is overloaded"):
                hf.text_generation(PROMPT, max_new_tokens=5)
            with pytest.raises(OverloadedError):
                list(hf.text_generation(PROMPT, max_new_tokens=5, stream=True))
        assert _wait_idle(small_server)["active"] == 0
        assert hf.text_generation(PROMPT, max_new_tokens=5)


def test_scheduled_overload_then_success(client: InferenceClient, sim: str) -> None:
    _schedule(sim, "overloaded", count=1)
    with pytest.raises(OverloadedError):
        client.text_generation(PROMPT, max_new_tokens=5)
    assert client.text_generation(PROMPT, max_new_tokens=5)
    assert httpx.get(f"{sim}/sim/faults").json() == {"mode": None, "remaining": None}


def test_scheduled_faults_until_cleared(client: InferenceClient, sim: str) -> None:
    _schedule(sim, "validation", count=None)
    for _ in range(3):
        with pytest.raises(ValidationError):
            client.text_generation(PROMPT, max_new_tokens=5)
    httpx.delete(f"{sim}/sim/faults")
    assert client.text_generation(PROMPT, max_new_tokens=5)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_http500_fault_raises_incomplete_generation(
    client: InferenceClient, sim: str, stream: bool
) -> None:
    _schedule(sim, "http500")
    with pytest.raises(IncompleteGenerationError):
        result = client.text_generation(PROMPT, max_new_tokens=5, stream=stream)
        if stream:
            list(result)


def test_generation_fault_strikes_mid_stream(client: InferenceClient, sim: str) -> None:
    _schedule(sim, "generation")
    received = []
    with pytest.raises(GenerationError, match="Request failed during generation"):
        for event in client.text_generation(PROMPT, max_new_tokens=20, stream=True, details=True):
            received.append(event)
    assert len(received) == 3
    assert _wait_idle(sim)["active"] == 0


def test_disconnect_fault_drops_the_connection(client: InferenceClient, sim: str) -> None:
    _schedule(sim, "disconnect", count=2)
    with pytest.raises(httpx2.TransportError):
        list(client.text_generation(PROMPT, max_new_tokens=20, stream=True))
    with pytest.raises(httpx2.TransportError):
        client.text_generation(PROMPT, max_new_tokens=20)


def test_fault_header_applies_to_one_request(sim: str) -> None:
    with (
        InferenceClient(
            model=sim, api_key="x", timeout=30, headers={"X-Sim-Error": "overloaded"}
        ) as faulty,
        pytest.raises(OverloadedError),
    ):
        faulty.text_generation(PROMPT, max_new_tokens=5)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5}}
    assert httpx.post(f"{sim}/generate", json=body, timeout=10).status_code == 200


def test_chat_errors_use_the_messages_api_shapes(client: InferenceClient, sim: str) -> None:
    _schedule(sim, "overloaded", count=2)
    response = httpx.post(f"{sim}/v1/chat/completions", json={"messages": MESSAGES})
    assert (response.status_code, response.json()["error_type"]) == (429, "overloaded")
    with pytest.raises(UnknownError, match="Model is overloaded"):
        list(client.chat_completion(MESSAGES, max_tokens=5, stream=True))


# --- cancellation and latency -------------------------------------------------------------------


def test_cancel_frees_backend_slot(sim: str) -> None:
    before = _state(sim)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 500}}
    with httpx.stream("POST", f"{sim}/generate_stream", json=body, timeout=10) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert _state(sim)["active"] == 1
    after = _wait_idle(sim)
    assert after["active"] == 0
    assert after["cancelled"] == before["cancelled"] + 1
    assert "inferq_sim_active_generations 0" in httpx.get(f"{sim}/metrics").text


def test_non_stream_disconnect_frees_slot(sim: str) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 500}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{sim}/generate", json=body, timeout=0.3)
    assert _wait_idle(sim)["active"] == 0


def test_latency_model_lower_bounds(sim: str) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 10, "details": True}}
    started = time.monotonic()
    with httpx.stream("POST", f"{sim}/generate_stream", json=body, timeout=10) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        next(lines)
        first_token_s = time.monotonic() - started
        last = json.loads(list(lines)[-1].removeprefix("data: "))
    total_s = time.monotonic() - started
    tokens = last["details"]["generated_tokens"]
    assert first_token_s >= 0.04  # ttft 50 ms
    assert total_s >= 0.04 + 0.015 * (tokens - 1)  # itl 20 ms
    assert total_s < 5


# --- info and metrics ----------------------------------------------------------------------------


def test_info_health_models_and_metrics(sim: str) -> None:
    info = httpx.get(f"{sim}/info").json()
    assert info["model_id"] == "inferq/sim"
    assert info["max_concurrent_requests"] == 128
    assert {"max_input_tokens", "max_total_tokens", "router", "version"} <= set(info)
    health = httpx.get(f"{sim}/health")
    assert (health.status_code, health.content) == (200, b"")
    assert httpx.get(f"{sim}/v1/models").json()["data"][0]["id"] == "inferq/sim"
    metrics = httpx.get(f"{sim}/metrics").text
    for series in ("tgi_queue_size", "tgi_batch_current_size", "tgi_request_count"):
        assert f"\n{series} " in metrics
    assert set(_state(sim)) == {
        "active",
        "total_requests",
        "completed",
        "cancelled",
        "tokenize_requests",
    }
