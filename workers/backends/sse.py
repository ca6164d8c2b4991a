"""The token path's reader of a backend's event stream: one JSON parse an event.

huggingface_hub parses every event of a stream into its dataclasses, about 50 µs an event,
where the worker needs three fields of each. Here huggingface_hub still sends the request
and answers its refusals (status, error body, timeout: its exceptions, unchanged); this
reads the lines of the response it opened, as it would have read them, and decodes each
plain event with orjson (`json.loads` where orjson refuses what `json` reads: a lone
surrogate's escape, NaN, a number past a double's range; an integer past 64 bits, which
orjson reads as a float, fails the fast path's checks of the counts). Any event of another
shape (an error event, `[DONE]` written another way, a payload that is not the usual object)
goes to huggingface_hub's own parser, which raises or returns what it would have.
tests/test_lean_reader.py pins what the worker gets from both readers (deltas, finish
reason, usage, errors) on the same streams.
"""

from __future__ import annotations

import codecs
import contextlib
import email.message
import functools
import http.client
import json
import os
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, NoReturn
from urllib.parse import urlsplit

import httpx2
import orjson
from huggingface_hub import InferenceClient, constants
from huggingface_hub.errors import BadRequestError, HfHubHTTPError, InferenceTimeoutError
from huggingface_hub.inference._common import (
    RequestParameters,
    _format_chat_completion_stream_output,
    _format_text_generation_stream_output,
    raise_text_generation_error,
)
from huggingface_hub.utils import hf_raise_for_status

DONE = "data: [DONE]"


class Details(NamedTuple):
    """A TGI stream's closing figures (its last event's `details`)."""

    finish_reason: str
    generated_tokens: int | None
    input_length: int | None


class TgiChunk(NamedTuple):
    """One `/generate_stream` event: its token's text (None for a special token), details."""

    text: str | None
    details: Details | None


class Choice(NamedTuple):
    content: str | None
    finish_reason: str | None


class ChatChunk(NamedTuple):
    """One chat completion chunk: its choices, and usage as (prompt, completion) tokens."""

    choices: list[Choice]
    usage: tuple[int | None, int | None] | None


def data_lines(lines: Iterable[str]) -> Iterator[str]:
    """The `data:` lines up to `[DONE]`, as huggingface_hub picks them."""
    picker = DataLines()
    for line in lines:
        if picker.pick(line):
            yield line
        elif picker.done:
            return


class DataLines:
    """`_data` for lines that come in batches: which to parse, and whether `[DONE]` came."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def pick(self, line: str) -> bool:
        if self.done or not line.startswith("data:"):
            return False  # blank lines between events, keep-alive comments
        if line.strip() == DONE:
            self.done = True
            return False
        return True


def _object(line: str) -> dict[str, Any] | None:
    """The event's payload when it is a JSON object without an error, else None."""
    text = line[5:]
    try:
        payload = orjson.loads(text)  # a quarter of `json.loads`'s CPU on an event
    except orjson.JSONDecodeError:
        try:  # what orjson refuses and `json` reads, as huggingface_hub reads it
            payload = json.loads(text)
        except ValueError:
            return None
    if type(payload) is not dict or payload.get("error") is not None:
        return None
    return payload


def tgi_chunk(line: str) -> TgiChunk:
    """One `data:` line of a TGI stream, as huggingface_hub would read it."""
    chunk = _tgi_fast(line)
    if chunk is not None:
        return chunk
    return tgi_chunk_of(_format_text_generation_stream_output(line, True))


def _tgi_fast(line: str) -> TgiChunk | None:
    payload = _object(line)
    if payload is None:
        return None
    token = payload.get("token")
    if type(token) is not dict:
        return None
    text, special = token.get("text"), token.get("special")
    if type(text) is not str or type(special) is not bool:
        return None
    details = payload.get("details")
    if details is None:
        return TgiChunk(None if special else text, None)
    if type(details) is not dict:
        return None
    reason = details.get("finish_reason")
    generated, length = details.get("generated_tokens"), details.get("input_length")
    if type(reason) is not str or not (_count(generated) and _count(length)):
        return None
    return TgiChunk(None if special else text, Details(reason, generated, length))


def tgi_chunk_of(output: Any) -> TgiChunk:
    """huggingface_hub's TextGenerationStreamOutput as the worker reads it."""
    text = None if output.token.special else output.token.text
    details = output.details
    if details is None:
        return TgiChunk(text, None)
    return TgiChunk(
        text,
        Details(
            str(details.finish_reason),
            details.generated_tokens,
            getattr(details, "input_length", None),
        ),
    )


def chat_chunk(line: str) -> ChatChunk:
    """One `data:` line of a chat completion stream, as huggingface_hub would read it."""
    chunk = _chat_fast(line)
    if chunk is not None:
        return chunk
    return chat_chunk_of(_format_chat_completion_stream_output(line))


def _chat_fast(line: str) -> ChatChunk | None:
    payload = _object(line)
    if payload is None:
        return None
    raw = payload.get("choices")
    if raw is not None and type(raw) is not list:
        return None
    choices = []
    for choice in raw or ():
        if type(choice) is not dict:
            return None
        delta, reason = choice.get("delta"), choice.get("finish_reason")
        if delta is not None and type(delta) is not dict:
            return None
        content = delta.get("content") if delta is not None else None
        if not (_text(content) and _text(reason)):
            return None
        choices.append(Choice(content, reason))
    usage = payload.get("usage")
    if usage is None:
        return ChatChunk(choices, None)
    if type(usage) is not dict:
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not (_count(prompt) and _count(completion)):
        return None
    return ChatChunk(choices, (prompt, completion))


def chat_chunk_of(output: Any) -> ChatChunk:
    """huggingface_hub's ChatCompletionStreamOutput as the worker reads it."""
    choices = [
        Choice(choice.delta.content if choice.delta else None, choice.finish_reason)
        for choice in output.choices or []
    ]
    usage = output.usage
    if not usage:
        return ChatChunk(choices, None)
    return ChatChunk(choices, (usage.prompt_tokens, usage.completion_tokens))


def _count(value: object) -> bool:
    return value is None or type(value) is int


def _text(value: object) -> bool:
    return value is None or type(value) is str


# The request: built by huggingface_hub, sent here ---------------------------------------------


class _Built(Exception):
    """Carries the request huggingface_hub built, out of the call that would have sent it."""

    def __init__(self, request: RequestParameters) -> None:
        super().__init__()
        self.request = request


def built_request(client: InferenceClient, call: Callable[[], object]) -> RequestParameters:
    """The request `call` (a streaming call on `client`) would send, as huggingface_hub builds
    it (URL, payload, headers), without sending it."""

    def build(request_parameters: RequestParameters, *, stream: bool = False) -> NoReturn:
        raise _Built(request_parameters)

    client._inner_post = build  # type: ignore[method-assign]
    try:
        call()
    except _Built as built:
        return built.request
    finally:
        del client._inner_post
    raise RuntimeError("the call sent no request")


def lean_possible(url: str) -> bool:
    """Where the lean connection behaves as huggingface_hub's would: plain HTTP, no proxy,
    not offline (huggingface_hub refuses every request then)."""
    if not url.startswith("http://") or constants.is_offline_mode():
        return False
    return _unproxied(urlsplit(url).hostname or "")


@functools.lru_cache(maxsize=256)
def _unproxied(host: str) -> bool:
    """No HTTP proxy set for `host`, as the process's environment says (read once per host:
    reading it walks the whole environment, which every job did)."""
    proxies = urllib.request.getproxies()
    return "http" not in proxies or bool(urllib.request.proxy_bypass(host))


def json_body(request: RequestParameters) -> bytes:
    return json.dumps(request.json).encode()


class NotLean(Exception):
    """An answer the lean connection leaves to huggingface_hub (a redirect, say): the caller
    sends the request again through it."""


class LeanConnection:
    """One request on a connection of its own (closing it stops the backend's generation),
    read line by line; failures raised as huggingface_hub and httpx2 would raise them."""

    def __init__(self, request: RequestParameters, timeout: float | None) -> None:
        self.request = request
        self.timeout = timeout
        self._connection: http.client.HTTPConnection | None = None
        self._response: http.client.HTTPResponse | None = None
        # Kept apart: http.client hands the socket of an answer delimited by the connection's
        # close to the response, and `connection.sock` is None from then on.
        self._sock: socket.socket | None = None
        self._aborted = False
        self._lock = threading.Lock()

    def open(self) -> None:
        """Send the request and read the answer's head; a refusal raises what huggingface_hub
        raises for it."""
        parts = urlsplit(self.request.url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = json_body(self.request)
        headers = {k: v for k, v in self.request.headers.items() if k.lower() != "accept-encoding"}
        connection = http.client.HTTPConnection(
            parts.hostname or "", parts.port or 80, timeout=self.timeout
        )
        with self._lock:
            self._connection = connection
        try:
            connection.connect()
            with self._lock:
                self._sock = connection.sock
                aborted = self._aborted
            if aborted:
                _shut(self._sock)
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
        except TimeoutError as exc:
            raise InferenceTimeoutError(f"Inference call timed out: {self.request.url}") from exc
        except http.client.RemoteDisconnected as exc:
            raise httpx2.RemoteProtocolError(
                "Server disconnected without sending a response."
            ) from exc
        except (http.client.HTTPException, ValueError) as exc:
            raise httpx2.RemoteProtocolError(str(exc)) from exc
        except ConnectionRefusedError as exc:
            raise httpx2.ConnectError(str(exc)) from exc
        except OSError as exc:
            if connection.sock is None:
                raise httpx2.ConnectError(str(exc)) from exc
            raise httpx2.ReadError(str(exc)) from exc
        self._response = response
        if response.status != 200:
            self._refused(response)

    def _refused(self, response: http.client.HTTPResponse) -> NoReturn:
        if not 400 <= response.status < 600:
            raise NotLean(f"status {response.status}")
        try:
            content = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise httpx2.ReadError(str(exc)) from exc
        refusal(self.request, response.status, response.getheaders(), content)

    def lines(self) -> Iterator[str]:
        """The answer's lines, split as httpx2's `iter_lines` splits them.

        The body is taken from the socket in pieces as large as it holds (one system call
        for every event that waits there, where `readline` made several an event) and its
        chunked framing undone here, as http.client undoes it.
        """
        response = self._response
        assert response is not None
        charset = _charset(response)
        try:
            yield from _lines(_body(response), charset)
        except TimeoutError as exc:
            raise httpx2.ReadTimeout("timed out") from exc
        except http.client.IncompleteRead as exc:
            raise httpx2.RemoteProtocolError(
                "peer closed connection without sending complete message body"
                " (incomplete chunked read)"
            ) from exc
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise httpx2.ReadError(str(exc)) from exc

    def abort(self) -> None:
        """Fail a read blocked in another thread: shut the socket down."""
        with self._lock:
            self._aborted = True
            sock = self._sock
        _shut(sock)

    def close(self) -> None:
        """Close the connection, which stops the backend's generation (the response holds it
        alone once the answer is delimited by the close)."""
        if self._response is not None:
            self._response.close()
        if self._connection is not None:
            self._connection.close()


def refusal(
    request: RequestParameters, status: int, headers: list[tuple[str, str]], content: bytes
) -> NoReturn:
    """Raise what huggingface_hub raises for an answer of `status` (4xx or 5xx) to `request`:
    its `_inner_post`, and for text generation the TGI error mapping of `text_generation`."""
    answer = httpx2.Response(
        status, headers=headers, content=content, request=httpx2.Request("POST", request.url)
    )
    task = request.task
    try:
        hf_raise_for_status(answer)
    except HfHubHTTPError as error:
        if isinstance(error, BadRequestError) and task == "text-generation":
            raise NotLean("a server that is not TGI") from error
        if answer.status_code == 422 and task != "unknown":
            message = str(error.args[0])
            if len(answer.text) > 0:
                message += f"{os.linesep}{answer.text}{os.linesep}"
            error.args = (message, *error.args[1:])
        if task == "text-generation":
            raise_text_generation_error(error)
        raise
    raise NotLean(f"status {status}")  # pragma: no cover (4xx and 5xx raise)


def _shut(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _charset(response: http.client.HTTPResponse) -> str:
    return charset_of(response.headers.get("content-type"))


@functools.lru_cache(maxsize=64)
def charset_of(content_type: str | None) -> str:
    """httpx2's choice: the charset the answer's content type names, else UTF-8 (parsed once
    per header value: a backend sends the same one with every answer)."""
    header = email.message.Message()
    if content_type is not None:
        header["content-type"] = content_type
    charset = header.get_content_charset()
    if charset:
        try:
            return codecs.lookup(charset).name
        except LookupError:
            pass
    return "utf-8"


# The body, read by pieces ---------------------------------------------------------------------

_PIECE = 65536  # the most taken from the socket at once
_MAX_LINE = 65536  # the longest chunk-size or trailer line, as http.client's _MAXLINE


def _body(response: http.client.HTTPResponse) -> Iterator[bytes]:
    """The answer's body as it arrives: chunked, framed by its length, or up to the close.
    A cut before the end raises IncompleteRead, as http.client does."""
    fp = response.fp
    if fp is None:  # http.client read the whole (empty) answer already
        return
    read = fp.read1
    if response.chunked:
        yield from _unchunked(read)
        return
    left = response.length
    if left is None:  # delimited by the connection's close
        while piece := read(_PIECE):
            yield piece
        return
    while left > 0:
        piece = read(min(left, _PIECE))
        if not piece:
            raise http.client.IncompleteRead(b"")
        left -= len(piece)
        yield piece


def _unchunked(read: Callable[[int], bytes]) -> Iterator[bytes]:
    """The data of a chunked body, each piece as soon as it is read (a chunk need not be
    whole); after the last chunk, its trailers are read up to the blank line, as http.client
    reads them. Framing that cannot be read (a bad size, a cut) raises IncompleteRead, as
    httpx2 raises it; a body cut before its first chunk too (http.client ends it quietly).

    `at` walks the buffer, which is cut only when read into again: a read after a pause
    holds hundreds of events, and slicing off each would copy the rest every time."""
    buffer, at = b"", 0
    while True:
        end = buffer.find(b"\n", at)
        while end < 0:
            if len(buffer) - at > _MAX_LINE:
                raise http.client.LineTooLong("chunk size")
            buffer, at = buffer[at:] + _more(read), 0
            end = buffer.find(b"\n")
        try:
            size = int(buffer[at:end].split(b";", 1)[0], 16)
        except ValueError:
            raise http.client.IncompleteRead(b"") from None
        if size < 0:
            raise http.client.IncompleteRead(b"")
        at = end + 1
        if size == 0:
            _skip_trailers(read, buffer, at)
            return
        while size:
            if at >= len(buffer):
                buffer, at = _more(read), 0
            piece = buffer[at : at + size]
            at += len(piece)
            size -= len(piece)
            yield piece
        while len(buffer) - at < 2:  # the CRLF after the chunk's data
            buffer, at = buffer[at:] + _more(read), 0
        at += 2


def _skip_trailers(read: Callable[[int], bytes], buffer: bytes, at: int) -> None:
    """Read past the trailer lines up to the blank one, or to the close."""
    while True:
        end = buffer.find(b"\n", at)
        if end < 0:
            if len(buffer) - at > _MAX_LINE:
                raise http.client.LineTooLong("trailer line")
            more = read(_PIECE)
            if not more:
                return
            buffer, at = buffer[at:] + more, 0
            continue
        line, at = buffer[at : end + 1], end + 1
        if line in (b"\r\n", b"\n"):
            return


def _more(read: Callable[[int], bytes]) -> bytes:
    piece = read(_PIECE)
    if not piece:
        raise http.client.IncompleteRead(b"")
    return piece


def _lines(pieces: Iterable[bytes], charset: str) -> Iterator[str]:
    lines = LineSplitter(charset)
    for piece in pieces:
        yield from lines.feed(piece)
    yield from lines.end()


class LineSplitter:
    """Lines as `readline` then `splitlines` made them, from pieces of a body as they come:
    cut after each b"\n", each line decoded on its own (in UTF-8, where a b"\n" never ends a
    character, the whole run of lines in one call). A line that ends in no b"\n" before the
    body is cut is not given: the cut is (httpx2 does the same)."""

    __slots__ = ("_charset", "_each", "_held")

    def __init__(self, charset: str) -> None:
        self._charset = charset
        self._each = charset != "utf-8"
        self._held: list[bytes] = []  # the pieces of a line not ended yet

    def feed(self, piece: bytes) -> list[str]:
        end = piece.rfind(b"\n") + 1
        if not end:
            self._held.append(piece)
            return []
        block = piece[:end]
        if self._held:
            block = b"".join([*self._held, block])
            self._held = []
        if end < len(piece):
            self._held.append(piece[end:])
        if not self._each:
            return block.decode(self._charset, "replace").splitlines()
        return [
            text
            for line in block.split(b"\n")[:-1]
            for text in (line + b"\n").decode(self._charset, "replace").splitlines()
        ]

    def end(self) -> list[str]:
        """The last line, ended by the body's end."""
        if not self._held:
            return []
        return b"".join(self._held).decode(self._charset, "replace").splitlines()
