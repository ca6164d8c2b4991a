"""Streaming OpenAI replies: a job's token events as chat or text completion chunks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from api.auth import Principal
from api.events.response import EventStream, GeneratorSource
from api.openai.errors import OpenAIError
from api.openai.schemas import ErrorBody
from api.openai.service import Reply, abandon, finish_reason, job_error, job_events, usage
from api.state import AppState
from inferq.events import TERMINAL_EVENTS, Event, EventType
from inferq.models import JobStatus
from inferq.protocol import DoneData, ErrorData, TokenData

PING = b": ping\n\n"
DONE = ServerSentEvent(data="[DONE]").encode()
# A reader that takes no bytes for this long is dropped.
SEND_TIMEOUT_SECONDS = 30.0


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


def _sse(model: BaseModel, include_usage: bool = True) -> bytes:
    exclude = None if include_usage else {"usage"}
    return ServerSentEvent(data=model.model_dump_json(exclude=exclude)).encode()


def _error_event(error: OpenAIError) -> bytes:
    return ServerSentEvent(data=ErrorBody(error=error.detail).model_dump_json()).encode()


@dataclass
class ChunkStream:
    """A job's events as OpenAI chunks: `data: {chunk}` ... `data: [DONE]`."""

    state: AppState
    key: Principal
    reply: Reply
    relay: Relay = field(default_factory=Relay)
    last_write: float = field(default_factory=time.monotonic)

    async def chunks(self) -> AsyncGenerator[bytes]:
        """The stream's bytes: the opening, a chunk per piece of text, the end, `[DONE]`.

        A stream with nothing to say gets a comment line now and then (the hub wakes idle
        readers every few seconds); a process that stops ends its streams at once.
        """
        for chunk in self.reply.opening():
            yield self._sse(chunk)
        try:
            async with contextlib.aclosing(self._from_job()) as outs:
                async for out in outs:
                    self.last_write = time.monotonic()
                    yield out
        except Diverged:
            yield _error_event(self._diverged())
        except OpenAIError as exc:
            yield _error_event(exc)
        else:
            if not self.relay.ended:
                return  # the process is stopping: no `[DONE]`, the answer is not complete
        self.relay.ended = True
        yield DONE

    async def _from_job(self) -> AsyncGenerator[bytes]:
        events = job_events(self.state, self.reply.job_id)
        async with contextlib.aclosing(events.batches()) as batches:
            async for batch in batches:
                for event in batch:
                    for out in self._translate(event):
                        yield out
                    if event.type in TERMINAL_EVENTS:
                        self.relay.ended = True
                        return
                if self.state.hub.draining:
                    return
                if not batch and time.monotonic() - self.last_write >= self.ping_seconds:
                    yield PING

    @property
    def ping_seconds(self) -> float:
        return self.state.settings.sse_ping_seconds

    def _translate(self, event: Event) -> list[bytes]:
        if event.type is EventType.reset:
            self.relay.reset()
        elif event.type is EventType.token:
            text = self.relay.token(event.parse(TokenData).text)
            return [self._sse(self.reply.chunk(text))] if text else []
        elif event.type is EventType.done:
            return self._closing(event.parse(DoneData))
        elif event.type is EventType.error:
            error = event.parse(ErrorData)
            raise job_error(self.reply.job_id, error.type, error.message)
        return []

    def _closing(self, done: DoneData) -> list[bytes]:
        if done.status not in (JobStatus.succeeded, JobStatus.cancelled):
            raise job_error(self.reply.job_id, done.status, "the job did not finish")
        self.relay.settle()
        out = [self._sse(self.reply.chunk(reason=finish_reason(done.finish_reason)))]
        if self.reply.include_usage:
            counts = done.usage
            usage_chunk = self.reply.usage_chunk(usage(counts.input_tokens, counts.output_tokens))
            out.append(self._sse(usage_chunk))
        return out

    def _sse(self, chunk: BaseModel) -> bytes:
        return _sse(chunk, self.reply.include_usage)

    def _diverged(self) -> OpenAIError:
        return OpenAIError(
            500,
            "the generation restarted after a failure and its new text differs from the text"
            f" already streamed; job {self.reply.job_id} holds the final output",
            code="generation_restarted",
            job_id=str(self.reply.job_id),
        )

    async def on_disconnect(self) -> None:
        if not self.relay.ended:
            await abandon(self.state, self.key, self.reply.job_id)


def stream(state: AppState, key: Principal, reply: Reply) -> EventStream:
    chunks = ChunkStream(state, key, reply)
    headers = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}
    return EventStream(
        GeneratorSource(chunks.chunks()),
        headers={**reply.headers, **headers},
        on_disconnect=chunks.on_disconnect,
        send_timeout=SEND_TIMEOUT_SECONDS,
    )
