"""Text Generation Inference through huggingface_hub's InferenceClient."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from huggingface_hub import InferenceClient

from inferq.registry import ModelSpec
from workers.backends.base import Completion, GenerationRequest
from workers.backends.errors import TRANSLATED, translate


class ClientStream(ABC):
    """One streaming call on its own InferenceClient, so closing it closes only this connection."""

    def __init__(self, client: InferenceClient) -> None:
        self.client = client
        self.completion = Completion()

    @abstractmethod
    def __iter__(self) -> Iterator[str]: ...

    def close(self) -> None:
        self.client.close()

    def _guard(self, produce: Iterator[str]) -> Iterator[str]:
        try:
            yield from produce
        except TRANSLATED as exc:
            raise translate(exc) from exc
        finally:
            self.close()


def make_client(spec: ModelSpec, api_key: str | None, timeout: float) -> InferenceClient:
    # An explicit api_key keeps a locally saved Hugging Face token from being sent.
    return InferenceClient(model=spec.url, api_key=api_key or "-", timeout=timeout)


class TextGenerationStream(ClientStream):
    def __init__(self, client: InferenceClient, request: GenerationRequest) -> None:
        super().__init__(client)
        self.request = request

    def __iter__(self) -> Iterator[str]:
        return self._guard(self._tokens())

    def _tokens(self) -> Iterator[str]:
        for chunk in self.client.text_generation(
            self.request.prompt or "", **tgi_params(self.request)
        ):
            if not chunk.token.special:
                yield chunk.token.text
            if chunk.details is not None:
                self.completion.finish_reason = str(chunk.details.finish_reason)
                self.completion.output_tokens = chunk.details.generated_tokens
                self.completion.input_tokens = getattr(chunk.details, "input_length", None)


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
