"""A small client for `inferq submit`: submit, then poll or stream the events."""

from __future__ import annotations

import json
import sys
import time

import httpx
from httpx_sse import connect_sse

TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


def submit_and_print(
    url: str, key: str, prompt: str, model: str, max_tokens: int, stream: bool
) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(30, read=120)) as http:
        response = http.post(
            "/v1/jobs", json={"model": model, "prompt": prompt, "max_tokens": max_tokens}
        )
        if response.status_code >= 400:
            print(response.json().get("error", response.text), file=sys.stderr)
            return 1
        job = response.json()
        if stream:
            return _stream(http, job["id"])
        return _poll(http, job["id"])


def _stream(http: httpx.Client, job_id: str) -> int:
    status = "failed"
    with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source:
        for event in source.iter_sse():
            data = json.loads(event.data) if event.data else {}
            if event.event == "token":
                sys.stdout.write(data["text"])
                sys.stdout.flush()
            elif event.event == "reset":
                sys.stdout.write("\n[restarted]\n")
            elif event.event == "done":
                status = data.get("status", "succeeded")
                break
            elif event.event == "error":
                print(f"\nerror: {data.get('type')}: {data.get('message')}", file=sys.stderr)
                break
    sys.stdout.write("\n")
    return 0 if status == "succeeded" else 1


def _poll(http: httpx.Client, job_id: str) -> int:
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            break
        time.sleep(0.2)
    if job["status"] == "succeeded":
        print(job["output"])
        return 0
    print(f"{job['status']}: {job.get('error')}", file=sys.stderr)
    return 1
