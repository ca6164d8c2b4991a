"""Request bodies, shaped like TGI's router structs (unknown fields are ignored)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerateParameters(_Body):
    """TGI `GenerateParameters`; booleans default to false when `parameters` is present."""

    best_of: NonNegativeInt | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: NonNegativeInt | None = None
    return_full_text: bool | None = None
    stop: list[str] = Field(default_factory=list)
    truncate: NonNegativeInt | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: NonNegativeInt | None = None
    top_n_tokens: NonNegativeInt | None = None
    grammar: dict[str, Any] | None = None
    adapter_id: str | None = None

    @property
    def sampling(self) -> bool:
        """Whether TGI would sample (any warper set counts, as in TGI's server)."""
        warpers = (self.temperature, self.top_k, self.top_p, self.typical_p)
        return self.do_sample or any(w is not None for w in warpers)


def _default_parameters() -> GenerateParameters:
    """TGI's parameters when the body has none: sampling on."""
    return GenerateParameters(do_sample=True)


class GenerateRequest(_Body):
    """Body of `/generate` and `/generate_stream`."""

    inputs: str
    parameters: GenerateParameters = Field(default_factory=_default_parameters)


class CompatGenerateRequest(GenerateRequest):
    """Body of the `/` compat route."""

    stream: bool = False


class StreamOptions(_Body):
    """Chat `stream_options`."""

    include_usage: bool = False


class ChatMessage(_Body):
    """One chat message; content may be a string or a list of text parts."""

    role: str
    content: str | list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        """The message's text content."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(_Body):
    """Body of `/v1/chat/completions` (TGI Messages API)."""

    model: str | None = None
    messages: list[ChatMessage]
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: NonNegativeInt | None = None
    max_tokens: NonNegativeInt | None = None
    n: PositiveInt | None = None
    seed: NonNegativeInt | None = None
    stop: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        """OpenAI clients may send a single stop string."""
        return [value] if isinstance(value, str) else value

    def to_parameters(self) -> GenerateParameters:
        """Map to generate parameters the way TGI does (`temperature: 0` means greedy)."""
        greedy = self.temperature == 0.0
        presence = self.presence_penalty
        return GenerateParameters(
            do_sample=not greedy,
            temperature=None if greedy else self.temperature,
            top_p=self.top_p,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=None if presence is None else presence + 2.0,
            max_new_tokens=self.max_tokens,
            stop=self.stop or [],
            seed=self.seed,
            details=True,
        )


# How long the `stall` fault holds the first token unless told otherwise.
DEFAULT_FAULT_STALL_MS = 2000.0


class FaultMode(StrEnum):
    """Faults that can be injected into a request."""

    OVERLOADED = "overloaded"
    VALIDATION = "validation"
    GENERATION = "generation"
    HTTP500 = "http500"
    DISCONNECT = "disconnect"
    STALL = "stall"
    # A stream that ends cleanly after a few tokens, with no final event (TGI: no details;
    # chat: no finish_reason, no usage), as a proxy cutting the response would leave it.
    CUT = "cut"
    # The generation stops after a few tokens with finish reason `abort` (vLLM's, when the
    # engine drops a request).
    ABORT = "abort"
    # The output holds a NUL character, which some models do emit.
    NUL = "nul"
    # An unreadable SSE event after a few tokens.
    GARBAGE = "garbage"


class FaultRequest(_Body):
    """Body of `POST /sim/faults`: the next `count` requests (null: all) get `mode`."""

    mode: FaultMode | None
    count: PositiveInt | None = None
    stall_ms: float = Field(default=DEFAULT_FAULT_STALL_MS, ge=0)
