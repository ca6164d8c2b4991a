"""What every backend provides: a stream of text deltas, then usage and a finish reason."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

# Postgres text refuses NUL; the stream and the stored output must carry the same text.
NUL = "\x00"
REPLACEMENT = "\ufffd"

# Addresses of backends, which tenants must not be shown: URLs, IP addresses, host:port.
_ADDRESS = re.compile(
    r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>()\[\]]+"
    r"|\[[0-9a-fA-F:.]+\](?::\d+)?"
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"
    r"|\b[a-zA-Z][\w.-]*:\d{2,5}\b"
)


def redact(message: str, host: str | None = None) -> str:
    """`message` as tenants may read it: no backend address, no NUL."""
    message = _ADDRESS.sub("<backend>", message.replace(NUL, REPLACEMENT))
    if host:
        message = message.replace(host, "<backend>")
    return message


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt: str | None
    messages: list[dict[str, Any]] | None
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass(slots=True)
class Completion:
    """Filled in by the backend as the stream ends."""

    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


class BackendError(Exception):
    """A backend failure; `retryable` says whether another attempt may succeed.

    The message is stored and shown to the job's tenant: it says what happened, without the
    backend's address (the worker's log has the whole exception).
    """

    retryable = True

    def __init__(self, type_: str, message: str) -> None:
        message = redact(message)
        super().__init__(message)
        self.type = type_
        self.message = message


class RetryableBackendError(BackendError):
    retryable = True


class FatalBackendError(BackendError):
    retryable = False


class BackendStream(Protocol):
    completion: Completion

    def __iter__(self) -> Iterator[str]: ...

    def close(self) -> None: ...

    def abort(self) -> None:
        """Fail a read blocked in another thread (cancel, deadline, shutdown)."""
