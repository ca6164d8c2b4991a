"""Map huggingface_hub / httpx failures to the backend exception tree."""

from __future__ import annotations

import json

import httpx2
from huggingface_hub.errors import (
    GenerationError,
    HfHubHTTPError,
    IncompleteGenerationError,
    InferenceTimeoutError,
    OverloadedError,
    TextGenerationError,
    UnknownError,
    ValidationError,
)

from workers.backends.base import BackendError, FatalBackendError, RetryableBackendError

# Exceptions a backend call may raise that translate() understands.
TRANSLATED = (TextGenerationError, HfHubHTTPError, InferenceTimeoutError, httpx2.HTTPError)


def _http_error(exc: HfHubHTTPError) -> BackendError:
    status = exc.response.status_code if exc.response is not None else 0
    message = _server_message(exc)
    if status == 429:
        return RetryableBackendError("overloaded", message)
    if status >= 500 or status in (408, 0):
        return RetryableBackendError("backend_unavailable", message)
    return FatalBackendError("validation" if status == 422 else "backend_rejected", message)


def _server_message(exc: HfHubHTTPError) -> str:
    """The server's own error text when it sent one, else the exception's."""
    try:
        body = exc.response.json()
    except (ValueError, AttributeError, httpx2.HTTPError):
        return str(exc).splitlines()[0]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error or body)


def _unknown(exc: UnknownError) -> BackendError:
    """In-stream chat errors arrive as UnknownError carrying a dict; classify by its text."""
    text = str(exc)
    lowered = text.lower()
    try:
        payload = json.loads(text.replace("'", '"'))
        text = str(payload.get("message", text))
    except (ValueError, AttributeError):
        pass
    if "overloaded" in lowered:
        return RetryableBackendError("overloaded", text)
    if "validation" in lowered or ("422" in lowered and "overloaded" not in lowered):
        return FatalBackendError("validation", text)
    return RetryableBackendError("generation", text)


# What a transport failure means, in words a tenant can act on (the class names are httpx's).
_TRANSPORT = {
    "ConnectError": "could not connect",
    "ConnectTimeout": "timed out while connecting",
    "ReadTimeout": "sent nothing for longer than the timeout",
    "WriteTimeout": "timed out while receiving the request",
    "PoolTimeout": "no connection was free in time",
    "RemoteProtocolError": "closed the connection in the middle of the response",
    "ReadError": "the connection failed while reading",
    "WriteError": "the connection failed while sending",
}


def _transport(exc: BaseException) -> str:
    name = type(exc).__name__
    return f"{_TRANSPORT.get(name, 'transport error')} ({name})"


def unreadable(exc: BaseException) -> BackendError:
    """A backend answer the client could not parse: retrying would read the same; fail once."""
    return FatalBackendError(
        "backend_error", f"the backend's response could not be read: {type(exc).__name__}: {exc}"
    )


def unexpected(exc: BaseException) -> BackendError:
    """Any other failure of a generation: it would recur on every attempt; fail once."""
    return FatalBackendError(
        "backend_error", f"the generation failed unexpectedly: {type(exc).__name__}: {exc}"
    )


def translate(exc: BaseException) -> BackendError:
    """One BackendError for any failure raised while calling or reading a backend."""
    if isinstance(exc, ValidationError):
        return FatalBackendError("validation", str(exc))
    if isinstance(exc, OverloadedError):
        return RetryableBackendError("overloaded", str(exc))
    if isinstance(exc, GenerationError | IncompleteGenerationError):
        return RetryableBackendError("generation", str(exc))
    if isinstance(exc, UnknownError):
        return _unknown(exc)
    if isinstance(exc, HfHubHTTPError):
        return _http_error(exc)
    if isinstance(exc, InferenceTimeoutError):
        return RetryableBackendError("timeout", "backend timed out: no answer within the timeout")
    if isinstance(exc, httpx2.TimeoutException):
        return RetryableBackendError("timeout", f"backend timed out: {_transport(exc)}")
    if isinstance(exc, httpx2.HTTPError):
        return RetryableBackendError("connection", f"backend unreachable: {_transport(exc)}")
    return unreadable(exc)
