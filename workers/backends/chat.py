"""Chat completions (TGI's Messages API, or any OpenAI-compatible server)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from huggingface_hub import InferenceClient

from inferq.registry import ModelSpec
from workers.backends.base import GenerationRequest
from workers.backends.tgi import ClientStream


class ChatStream(ClientStream):
    def __init__(
        self, client: InferenceClient, request: GenerationRequest, model: str | None
    ) -> None:
        super().__init__(client)
        self.request = request
        self.model = model

    def __iter__(self) -> Iterator[str]:
        return self._guard(self._deltas())

    def _deltas(self) -> Iterator[str]:
        chunks = self.client.chat_completion(
            self.request.messages or [], **chat_params(self.request, self.model)
        )
        for chunk in chunks:
            for choice in chunk.choices or []:
                if choice.delta and choice.delta.content:
                    yield choice.delta.content
                if choice.finish_reason:
                    self.completion.finish_reason = choice.finish_reason
            if chunk.usage:
                self.completion.input_tokens = chunk.usage.prompt_tokens
                self.completion.output_tokens = chunk.usage.completion_tokens


def chat_params(request: GenerationRequest, model: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "stop": request.stop or None,
    }
    if model:
        params["model"] = model
    return params


class OpenAIBackend:
    """Any OpenAI-compatible server (vLLM, SGLang, llama.cpp server, hosted APIs)."""

    def __init__(self, spec: ModelSpec, api_key: str | None, timeout: float) -> None:
        self.spec = spec
        self.api_key = api_key
        self.timeout = timeout

    def stream(self, request: GenerationRequest) -> ChatStream:
        # A bare prompt is sent as one user message: chat is what every such server speaks.
        if request.messages is None:
            request = _as_chat(request)
        client = InferenceClient(
            base_url=self.spec.url, api_key=self.api_key or "-", timeout=self.timeout
        )
        return ChatStream(client, request, model=self.spec.upstream_model or self.spec.name)

    def close(self) -> None:
        pass


def _as_chat(request: GenerationRequest) -> GenerationRequest:
    return replace(request, messages=[{"role": "user", "content": request.prompt or ""}])
