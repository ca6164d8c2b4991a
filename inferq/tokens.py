"""Input token counts: the backend's own tokenizer where it has one, else an estimate.

`tgi` models are asked `POST /tokenize` (TGI and the simulator answer a list of
`{id, text, start, stop}`); `openai` models are asked llama.cpp server's `POST /tokenize`
(`{"content": ...}` answered with `{"tokens": [...]}`) at the server's root. A backend without
a tokenizer, or one that fails or is slow, gets the estimate `ceil(chars / 4)`; such a backend
is not asked again for a while, so submits stay fast.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import httpx
from cachetools import LRUCache, TTLCache

from inferq.registry import ModelSpec

CHARS_PER_TOKEN = 4
# Counting must not slow a submit down much: past this the estimate is used.
DEFAULT_TIMEOUT_SECONDS = 1.0
DEFAULT_CACHE_SIZE = 20_000
# A backend whose tokenizer failed is not asked again for this long.
NO_TOKENIZER_SECONDS = 60.0


def estimate(text: str) -> int:
    """Tokens in `text` without a tokenizer: about four characters each."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def upper_bound(text: str) -> int:
    """At least as many tokens as any tokenizer makes of `text` (byte-level BPE, sentencepiece
    with byte fallback and word tokenizers all make at most one token per byte)."""
    return len(text.encode())


@dataclass(frozen=True, slots=True)
class Count:
    tokens: int
    exact: bool  # counted by the backend's tokenizer, not estimated


class TokenCounter:
    """Counts through the backends' tokenizers, remembering answers per (model, text)."""

    def __init__(
        self,
        timeout_s: float = DEFAULT_TIMEOUT_SECONDS,
        cache_size: int = DEFAULT_CACHE_SIZE,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._counts: LRUCache[tuple[str, str], int] = LRUCache(cache_size)
        self._without: TTLCache[str, bool] = TTLCache(1024, NO_TOKENIZER_SECONDS)
        self.hits = 0  # answers from the cache
        self.calls = 0  # requests to a tokenizer

    async def count(self, spec: ModelSpec, text: str) -> Count:
        key = (spec.name, hashlib.sha256(text.encode()).hexdigest())
        cached = self._counts.get(key)
        if cached is not None:
            self.hits += 1
            return Count(cached, exact=True)
        if spec.url in self._without:
            return Count(estimate(text), exact=False)
        tokens = await self._ask(spec, text)
        if tokens is None:
            self._without[spec.url] = True
            return Count(estimate(text), exact=False)
        self._counts[key] = tokens
        return Count(tokens, exact=True)

    async def _ask(self, spec: ModelSpec, text: str) -> int | None:
        url, body = _request(spec, text)
        headers = {}
        if spec.api_key is not None:
            headers["Authorization"] = f"Bearer {spec.api_key.get_secret_value()}"
        self.calls += 1
        try:
            response = await self._client.post(url, json=body, headers=headers)
            if response.status_code != 200:
                return None
            return _parse(response.json())
        except (httpx.HTTPError, ValueError):
            return None

    async def aclose(self) -> None:
        await self._client.aclose()


def _request(spec: ModelSpec, text: str) -> tuple[str, dict[str, Any]]:
    if spec.backend == "tgi":
        return f"{spec.url}/tokenize", {"inputs": text}
    root = spec.url.removesuffix("/v1")  # llama.cpp serves /tokenize beside /v1
    return f"{root}/tokenize", {"content": text, "add_special": False}


def _parse(payload: object) -> int | None:
    """TGI: a list of tokens; llama.cpp: `{"tokens": [...]}`; anything else: no count."""
    if isinstance(payload, list):
        return len(payload)
    if isinstance(payload, dict) and isinstance(payload.get("tokens"), list):
        return len(payload["tokens"])
    return None
