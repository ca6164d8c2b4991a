"""Chat completions (TGI's Messages API, or any OpenAI-compatible server)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from huggingface_hub import InferenceClient

from inferq.registry import ModelSpec
from workers.backends import sse
from workers.backends.base import GenerationRequest
from workers.backends.errors import TRANSLATED
from workers.backends.tgi import ClientStream

log = logging.getLogger("inferq.worker")


class ChatStream(ClientStream):
    def __init__(
        self,
        client: InferenceClient,
        request: GenerationRequest,
        model: str | None,
        lean: bool = True,
    ) -> None:
        super().__init__(client, lean)
        self.request = request
        self.model = model

    def __iter__(self) -> Iterator[str]:
        return self._guard(self._deltas())

    def _call(self) -> Any:
        return self.client.chat_completion(
            self.request.messages or [], **chat_params(self.request, self.model)
        )

    parse = staticmethod(sse.chat_chunk)  # type: ignore[assignment]
    _chunk_of = staticmethod(sse.chat_chunk_of)

    def take(self, chunk: sse.ChatChunk) -> list[str]:
        choices, usage = chunk
        deltas = []
        for content, reason in choices:
            if content:
                deltas.append(content)
            if reason:
                self.completion.finish_reason = reason
        if usage is not None:
            self.completion.input_tokens, self.completion.output_tokens = usage
        return deltas


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


class OpenAIChatStream(ChatStream):
    """Chat on an OpenAI-compatible server, with the server's own token counts.

    They come from the last chunk when the server honours `stream_options.include_usage`
    (vLLM, SGLang, TGI, llama.cpp's llama-server, OpenAI). llama-cpp-python's server never
    streams usage: the prompt's count is then asked with a one-token request (its prompt
    cache makes that cheap), and the completion's count is the number of streamed deltas,
    which that server sends one per token (except when it joins the tokens of a split
    character, or holds back text that may start a stop sequence).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._streamed = 0  # deltas

    def take(self, chunk: sse.ChatChunk) -> list[str]:
        deltas = super().take(chunk)
        self._streamed += len(deltas)
        return deltas

    def ended(self) -> None:
        super().ended()
        if self.completion.output_tokens is None:
            self.completion.output_tokens = self._streamed
        if self.completion.input_tokens is None:
            self.completion.input_tokens = self._prompt_tokens()

    def _prompt_tokens(self) -> int | None:
        try:
            reply = self.client.chat_completion(
                self.request.messages or [], model=self.model, max_tokens=1
            )
        except TRANSLATED as exc:
            # The text is complete; a missing count must not fail or retry the generation.
            log.warning("could not count the prompt's tokens: %s", exc)
            return None
        return reply.usage.prompt_tokens if reply.usage else None


def openai_stream(
    spec: ModelSpec, request: GenerationRequest, api_key: str | None, timeout: float
) -> OpenAIChatStream:
    """Any OpenAI-compatible server (vLLM, SGLang, llama.cpp server, hosted APIs)."""
    # A bare prompt is sent as one user message: chat is what every such server speaks.
    if request.messages is None:
        request = _as_chat(request)
    client = InferenceClient(base_url=spec.url, api_key=api_key or "-", timeout=timeout)
    return OpenAIChatStream(client, request, model=spec.upstream_model or spec.name)


def _as_chat(request: GenerationRequest) -> GenerationRequest:
    return replace(request, messages=[{"role": "user", "content": request.prompt or ""}])
