"""Events as server-sent events on the wire."""

from __future__ import annotations

from dataclasses import replace

from sse_starlette import ServerSentEvent

from inferq.events import Event


def encode(event: Event) -> bytes:
    if event.wire:
        return event.wire
    return ServerSentEvent(data=event.data, event=event.type.value, id=event.id or None).encode()


def rendered(event: Event) -> Event:
    """The event with its wire form attached, so that each client need not render it again."""
    return replace(event, wire=encode(event))
