"""Text Generation Inference through huggingface_hub's InferenceClient."""

from __future__ import annotations

import contextlib
import logging
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import InferenceClient
from huggingface_hub.inference._common import RequestParameters

from inferq.registry import ModelSpec
from workers.backends import sse
from workers.backends.base import (
    NUL,
    REPLACEMENT,
    BackendError,
    Completion,
    GenerationRequest,
    RetryableBackendError,
    redact,
)
from workers.backends.errors import TRANSLATED, translate, unreadable

log = logging.getLogger("inferq.worker")

# Finish reasons that mean the generation did not finish (vLLM's), though the stream ended.
_UNFINISHED = frozenset({"abort", "error"})


class ClientStream(ABC):
    """One streaming call on its own InferenceClient, so closing it closes only this connection.

    `lean` (the default): huggingface_hub builds the request, which is sent and read by
    workers/backends/sse.py (where it can be; else huggingface_hub sends it, and its lines
    are still parsed there). False: huggingface_hub sends, reads and parses it, into its
    dataclasses: what the lean reader is pinned to.
    """

    def __init__(self, client: InferenceClient, lean: bool = True) -> None:
        self.client = client
        self.lean = lean
        self.completion = Completion()
        # The client keeps its streaming responses on this stack until it is closed.
        self._responses = client.exit_stack = _Responses()
        self._connection: sse.LeanConnection | None = None

    @abstractmethod
    def __iter__(self) -> Iterator[str]: ...

    def close(self) -> None:
        self.client.close()
        if self._connection is not None:
            self._connection.close()

    def abort(self) -> None:
        """Fail the stream's blocked read from another thread (a cancel during prefill)."""
        self._responses.abort()
        if self._connection is not None:
            self._connection.abort()

    @abstractmethod
    def _call(self) -> Any:
        """The streaming call on the client, through huggingface_hub."""

    @abstractmethod
    def parse(self, line: str) -> Any:
        """One `data:` line of the answer as a chunk, as huggingface_hub would read it."""

    @abstractmethod
    def take(self, chunk: Any) -> list[str]:
        """A chunk's deltas; its closing figures go to `completion`."""

    def ended(self) -> None:
        """After the last chunk: a stream that did not finish fails (to be tried again)."""
        self._check_finished()

    def lean_request(self) -> RequestParameters | None:
        """The streaming call's request, when the lean reader may send it (else only
        huggingface_hub may: HTTPS, a proxy, offline mode, or `lean` off)."""
        if not self.lean:
            return None
        request = sse.built_request(self.client, self._call)
        return request if sse.lean_possible(request.url) else None

    def failure(self, exc: BaseException) -> BackendError:
        """Any failure of the call or the read as a BackendError (as `_guard` raises it)."""
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, TRANSLATED):
            return self._failure(translate(exc), exc)
        return self._failure(unreadable(exc), exc)

    def _deltas(self) -> Iterator[str]:
        for chunk in self._chunks():
            yield from self.take(chunk)
        self.ended()

    def _chunks(self) -> Iterator[Any]:
        # The request is sent (and a refusal raised) here, before the first event is read.
        if self.lean:
            return map(self.parse, sse.data_lines(self._lines()))
        return map(self._chunk_of, self._call())

    @staticmethod
    @abstractmethod
    def _chunk_of(output: Any) -> Any:
        """huggingface_hub's own output, as `parse` gives it."""

    def _lines(self) -> Iterator[str]:
        """The lines of the answer to the call: sent on a lean connection where one behaves
        as huggingface_hub's would, else by huggingface_hub."""
        call = self._call
        request = sse.built_request(self.client, call)
        if sse.lean_possible(request.url):
            connection = self._connection = sse.LeanConnection(request, self.client.timeout)
            if self._responses.aborted:
                connection.abort()
            try:
                connection.open()
                return connection.lines()
            except sse.NotLean:
                connection.close()
                self._connection = None
        call()
        return self._responses.lines()

    def _guard(self, produce: Iterator[str]) -> Iterator[str]:
        """The deltas, NUL-free; any failure as a BackendError; the connection closed at the end.

        An exception that is no known client error comes from reading an answer the client
        could not parse: it fails the job once, with its message, rather than escaping.
        """
        try:
            for delta in produce:
                yield delta.replace(NUL, REPLACEMENT) if NUL in delta else delta
        except BackendError:
            raise
        except Exception as exc:
            raise self.failure(exc) from exc
        finally:
            self.close()

    def _failure(self, error: BackendError, exc: BaseException) -> BackendError:
        """The error as tenants see it; the whole exception, address included, goes to the log."""
        url = self.client.model or ""
        log.warning("backend at %s failed (%s): %r", url, error.type, exc)
        host = urlsplit(url).hostname
        if host and host in error.message:
            return type(error)(error.type, redact(error.message, host))
        return error

    def _check_finished(self) -> None:
        """A stream that ended without saying it finished was cut short: try again."""
        reason = self.completion.finish_reason
        if reason is None:
            raise RetryableBackendError(
                "incomplete", "the backend's stream ended before the generation finished"
            )
        if reason in _UNFINISHED:
            raise RetryableBackendError(
                "incomplete", f"the backend ended the generation early (finish reason {reason})"
            )


_T = TypeVar("_T")


class _Responses(ExitStack):
    """An InferenceClient's exit stack that keeps its streaming responses in view.

    Closing the client from another thread does not wake a read blocked on its socket (on
    Linux); shutting the socket down does. The socket is reachable only from the response.
    """

    def __init__(self) -> None:
        super().__init__()
        self._held: list[httpx2.Response] = []
        self._aborted = False

    def enter_context(self, cm: AbstractContextManager[_T]) -> _T:
        value = super().enter_context(cm)
        if isinstance(value, httpx2.Response):
            self._held.append(value)
            if self._aborted:  # aborted while the request was being sent
                _shut(value)
        return value

    @property
    def aborted(self) -> bool:
        return self._aborted

    def lines(self) -> Iterator[str]:
        """The lines of the streaming response the client opened last."""
        return self._held[-1].iter_lines()

    def abort(self) -> None:
        self._aborted = True
        for response in list(self._held):
            _shut(response)


def _shut(response: httpx2.Response) -> None:
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def make_client(spec: ModelSpec, api_key: str | None, timeout: float) -> InferenceClient:
    # An explicit api_key keeps a locally saved Hugging Face token from being sent.
    return InferenceClient(model=spec.url, api_key=api_key or "-", timeout=timeout)


class TextGenerationStream(ClientStream):
    def __init__(
        self, client: InferenceClient, request: GenerationRequest, lean: bool = True
    ) -> None:
        super().__init__(client, lean)
        self.request = request

    def __iter__(self) -> Iterator[str]:
        return self._guard(self._deltas())

    def _call(self) -> Any:
        return self.client.text_generation(self.request.prompt or "", **tgi_params(self.request))

    parse = staticmethod(sse.tgi_chunk)  # type: ignore[assignment]
    _chunk_of = staticmethod(sse.tgi_chunk_of)

    def take(self, chunk: sse.TgiChunk) -> list[str]:
        text, details = chunk
        if details is not None:
            self.completion.finish_reason = details.finish_reason
            self.completion.output_tokens = details.generated_tokens
            self.completion.input_tokens = details.input_length
        return [] if text is None else [text]


def tgi_params(request: GenerationRequest) -> dict[str, Any]:
    """TGI parameters: always max_new_tokens and return_full_text=False; greedy is no sampling."""
    params: dict[str, Any] = {
        "stream": True,
        "details": True,
        "max_new_tokens": request.max_tokens,
        "return_full_text": False,
        "seed": request.seed,
        "stop": request.stop or None,
    }
    greedy = request.temperature == 0
    params["do_sample"] = not greedy
    if not greedy:
        params["temperature"] = request.temperature
        params["top_p"] = request.top_p
    return params
