"""A small client for `inferq submit`: submit, then poll or stream the events."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import httpx
from httpx_sse import connect_sse

from inferq.events import Event, EventType
from inferq.models import TERMINAL_STATUSES
from inferq.protocol import DoneData, ErrorData, TokenData


def submit_and_print(
    url: str,
    key: str,
    prompt: str,
    model: str,
    max_tokens: int,
    stream: bool,
    as_json: bool = False,
) -> int:
    return call_api(
        url, key, 120, lambda http: _submit(http, prompt, model, max_tokens, stream, as_json)
    )


def call_api(url: str, key: str, read_seconds: float, action: Callable[[httpx.Client], int]) -> int:
    """Run `action` with a client of the API that carries the key; exit code 2, with a hint,
    when the API cannot be reached."""
    headers = {"Authorization": f"Bearer {key}"}
    timeout = httpx.Timeout(30, read=read_seconds)
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as http:
            return action(http)
    except httpx.TransportError as exc:
        print(
            f"error: cannot reach the inferq API at {url} ({exc.__class__.__name__}); "
            "is it running? Set INFERQ_API_URL or --url.",
            file=sys.stderr,
        )
        return 2


def print_error(response: httpx.Response) -> int:
    """Say what the API refused, as its error envelope puts it; the exit code for it."""
    print(f"error: {_error_text(response)}", file=sys.stderr)
    return 1


def _submit(
    http: httpx.Client, prompt: str, model: str, max_tokens: int, stream: bool, as_json: bool
) -> int:
    response = http.post(
        "/v1/jobs", json={"model": model, "prompt": prompt, "max_tokens": max_tokens}
    )
    if response.status_code >= 400:
        return print_error(response)
    job_id = response.json()["id"]
    if stream:
        return _stream(http, job_id)
    return _poll(http, job_id, as_json)


def _error_text(response: httpx.Response) -> str:
    """`type: message` from the error envelope, or the status line for anything else."""
    try:
        error = response.json()["error"]
        return f"{error['type']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code} {response.reason_phrase}"


def _stream(http: httpx.Client, job_id: str) -> int:
    status = "failed"
    with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source:
        for sse in source.iter_sse():
            if sse.event not in set(EventType):
                continue  # an event this client does not know
            event = Event(EventType(sse.event), sse.data)
            if event.type is EventType.token:
                sys.stdout.write(event.parse(TokenData).text)
                sys.stdout.flush()
            elif event.type is EventType.reset:
                sys.stdout.write("\n[restarted]\n")
            elif event.type is EventType.done:
                status = event.parse(DoneData).status
                break
            elif event.type is EventType.error:
                error = event.parse(ErrorData)
                print(f"\nerror: {error.type}: {error.message}", file=sys.stderr)
                break
    sys.stdout.write("\n")
    return 0 if status == "succeeded" else 1


def _poll(http: httpx.Client, job_id: str, as_json: bool) -> int:
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL_STATUSES:
            break
        time.sleep(0.2)
    if as_json:
        print(json.dumps(job, indent=2))
        return 0 if job["status"] == "succeeded" else 1
    if job["status"] == "succeeded":
        print(job["output"])
        return 0
    error = job.get("error") or {}
    print(f"{job['status']}: {error.get('type')}: {error.get('message')}", file=sys.stderr)
    return 1
