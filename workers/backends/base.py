"""What every backend provides: a stream of text deltas, then usage and a finish reason."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


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
    """A backend failure; `retryable` says whether another attempt may succeed."""

    retryable = True

    def __init__(self, type_: str, message: str) -> None:
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
