"""Streaming OpenAI replies: a job's token events as chat or text completion chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.auth import Principal
from api.openai.errors import OpenAIError
from api.openai.schemas import ErrorBody
from api.openai.service import Reply, abandon, finish_reason, follow, job_error, usage
from api.state import AppState
from inferq.events import TERMINAL_EVENTS, Event, EventType
from inferq.models import JobStatus


class Diverged(Exception):
    """A restarted generation's text differs from what the client was already sent."""


@dataclass
class Relay:
    """What a stream has sent its client, so that a restarted generation can be followed.

    A `reset` event means the job's generation started over (a worker or backend failed
    mid-stream). Text already sent cannot be taken back, so the new attempt's text is held
    until it has passed what was sent: if it starts with that text (as a seeded or greedy
    generation does) the stream just goes on; if it differs, the stream ends with an error
    and the job, which still finishes, holds the final output.
    """

    sent: str = ""
    redo: str | None = None  # the restarted attempt's text while it is behind `sent`
    ended: bool = False

    def reset(self) -> None:
        if self.sent:
            self.redo = ""

    def token(self, text: str) -> str:
        """The part of `text` the client has not seen yet."""
        if self.redo is None:
            self.sent += text
            return text
        self.redo += text
        if not (self.sent.startswith(self.redo) or self.redo.startswith(self.sent)):
            raise Diverged
        if len(self.redo) < len(self.sent):
            return ""
        new, self.sent, self.redo = self.redo[len(self.sent) :], self.redo, None
        return new

    def settle(self) -> None:
        if self.redo is not None:  # the new attempt ended shorter than what was sent
            raise Diverged


def _sse(model: BaseModel, include_usage: bool = True) -> ServerSentEvent:
    exclude = None if include_usage else {"usage"}
    return ServerSentEvent(data=model.model_dump_json(exclude=exclude))


def _error_event(error: OpenAIError) -> ServerSentEvent:
    return ServerSentEvent(data=ErrorBody(error=error.detail).model_dump_json())


@dataclass
class ChunkStream:
    """A job's events as OpenAI chunks: `data: {chunk}` ... `data: [DONE]`."""

    state: AppState
    key: Principal
    reply: Reply
    relay: Relay = field(default_factory=Relay)

    async def __aiter__(self) -> AsyncIterator[ServerSentEvent]:
        for chunk in self.reply.opening():
            yield self._sse(chunk)
        try:
            async with follow(self.state, self.reply.job_id) as events:
                async for event in events:
                    for out in self._translate(event):
                        yield out
                    if event.type in TERMINAL_EVENTS:
                        break
        except Diverged:
            yield _error_event(self._diverged())
        except OpenAIError as exc:
            yield _error_event(exc)
        self.relay.ended = True
        yield ServerSentEvent(data="[DONE]")

    def _translate(self, event: Event) -> list[ServerSentEvent]:
        if event.type is EventType.reset:
            self.relay.reset()
        elif event.type is EventType.token:
            text = self.relay.token(event.payload()["text"])
            return [self._sse(self.reply.chunk(text))] if text else []
        elif event.type is EventType.done:
            return self._closing(event.payload())
        elif event.type is EventType.error:
            payload = event.payload()
            raise job_error(self.reply.job_id, payload.get("type"), payload.get("message", ""))
        return []

    def _closing(self, done: dict[str, Any]) -> list[ServerSentEvent]:
        if done.get("status") not in (JobStatus.succeeded, JobStatus.cancelled):
            raise job_error(self.reply.job_id, done.get("status"), "the job did not finish")
        self.relay.settle()
        out = [self._sse(self.reply.chunk(reason=finish_reason(done.get("finish_reason"))))]
        if self.reply.include_usage:
            counts = done.get("usage") or {}
            usage_chunk = self.reply.usage_chunk(
                usage(counts.get("input_tokens"), counts.get("output_tokens"))
            )
            out.append(self._sse(usage_chunk))
        return out

    def _sse(self, chunk: BaseModel) -> ServerSentEvent:
        return _sse(chunk, self.reply.include_usage)

    def _diverged(self) -> OpenAIError:
        return OpenAIError(
            500,
            "the generation restarted after a failure and its new text differs from the text"
            f" already streamed; job {self.reply.job_id} holds the final output",
            code="generation_restarted",
            job_id=str(self.reply.job_id),
        )

    async def on_disconnect(self, _message: object) -> None:
        if not self.relay.ended:
            await abandon(self.state, self.key, self.reply.job_id)


def stream(state: AppState, key: Principal, reply: Reply) -> EventSourceResponse:
    chunks = ChunkStream(state, key, reply)
    return EventSourceResponse(
        aiter(chunks),
        ping=int(state.settings.sse_ping_seconds),
        sep="\n",
        send_timeout=30,
        headers={**reply.headers, "Cache-Control": "no-cache"},
        client_close_handler_callable=chunks.on_disconnect,
    )
