"""Backends: turn a job into a stream of text deltas plus usage and a finish reason."""

from __future__ import annotations

from inferq.registry import ModelSpec
from workers.backends.base import (
    BackendError,
    BackendStream,
    Completion,
    FatalBackendError,
    GenerationRequest,
    RetryableBackendError,
)
from workers.backends.chat import ChatStream, OpenAIBackend
from workers.backends.tgi import TgiTextBackend, make_client

__all__ = [
    "BackendError",
    "BackendStream",
    "Completion",
    "FatalBackendError",
    "GenerationRequest",
    "RetryableBackendError",
    "open_stream",
]


def open_stream(spec: ModelSpec, request: GenerationRequest, timeout: float) -> BackendStream:
    """Start generating `request` on the model's backend."""
    api_key = spec.api_key.get_secret_value() if spec.api_key else None
    if spec.backend == "openai":
        return OpenAIBackend(spec, api_key, timeout).stream(request)
    if request.messages is not None:
        # TGI's Messages API applies the model's chat template.
        return ChatStream(make_client(spec, api_key, timeout), request, model="tgi")
    return TgiTextBackend(spec, api_key, timeout).stream(request)
