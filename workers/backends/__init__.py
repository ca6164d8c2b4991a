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
from workers.backends.chat import ChatStream, openai_stream
from workers.backends.tgi import TextGenerationStream, make_client

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
        return openai_stream(spec, request, api_key, timeout)
    client = make_client(spec, api_key, timeout)
    if request.messages is not None:
        # TGI's Messages API applies the model's chat template.
        return ChatStream(client, request, model="tgi")
    return TextGenerationStream(client, request)
