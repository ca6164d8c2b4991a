"""Reading a job's server-sent events the way a client would, with reconnects."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse


@dataclass
class Transcript:
    """Everything a client read from a job's events, across connections."""

    events: list[ServerSentEvent] = field(default_factory=list)
    connections: int = 0

    @property
    def last_id(self) -> str | None:
        ids = [e.id for e in self.events if e.id]
        return ids[-1] if ids else None

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1].event in {"done", "error"}

    def output(self) -> str:
        """Token texts after the last reset, concatenated."""
        text: list[str] = []
        for event in self.events:
            if event.event == "reset":
                text.clear()
            elif event.event == "token":
                text.append(json.loads(event.data)["text"])
        return "".join(text)

    def of_type(self, name: str) -> list[dict]:
        return [json.loads(e.data) for e in self.events if e.event == name]

    def ids(self) -> list[str]:
        return [e.id for e in self.events if e.id]


def _headers(transcript: Transcript) -> dict[str, str]:
    last = transcript.last_id
    return {"Last-Event-ID": last} if last else {}


def read(
    client: httpx.Client, job_id: str, transcript: Transcript, max_events: int | None = None
) -> Transcript:
    """One connection: read until the end, or drop it after `max_events` events."""
    transcript.connections += 1
    url = f"/v1/jobs/{job_id}/events"
    with connect_sse(client, "GET", url, headers=_headers(transcript)) as source:
        source.response.raise_for_status()
        for count, event in enumerate(source.iter_sse(), start=1):
            transcript.events.append(event)
            if event.event in {"done", "error"} or (max_events and count >= max_events):
                break
    return transcript


async def aread(client: httpx.AsyncClient, job_id: str) -> Transcript:
    transcript = Transcript(connections=1)
    async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
        source.response.raise_for_status()
        async for event in source.aiter_sse():
            transcript.events.append(event)
            if event.event in {"done", "error"}:
                break
    return transcript
