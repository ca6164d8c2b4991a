"""Simulator settings: latency model, limits and fault knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

# The TGI release whose HTTP protocol the simulator follows.
TGI_VERSION = "3.3.6-dev0"


def _help(text: str) -> dict[str, str]:
    """Field metadata holding the command-line help for a setting."""
    return {"help": text}


@dataclass(frozen=True)
class SimConfig:
    """Everything that shapes how the simulated TGI server behaves."""

    model_id: str = field(default="inferq/sim", metadata=_help("model id reported by /info"))
    ttft_ms: float = field(default=50.0, metadata=_help("base time to first token, ms"))
    prefill_ms_per_token: float = field(
        default=0.05, metadata=_help("extra time to first token per input token, ms")
    )
    itl_ms: float = field(
        default=20.0, metadata=_help("inter-token latency with one running sequence, ms")
    )
    batch_slowdown: float = field(
        default=0.01,
        metadata=_help("inter-token latency growth per extra running sequence (fraction)"),
    )
    max_concurrent_requests: int = field(
        default=128, metadata=_help("requests past this many get 429 overloaded")
    )
    max_input_tokens: int = field(default=4096, metadata=_help("longest accepted prompt, tokens"))
    max_total_tokens: int = field(
        default=8192, metadata=_help("limit on prompt + max_new_tokens, tokens")
    )
    max_stop_sequences: int = field(default=4, metadata=_help("most stop sequences per request"))
    default_max_new_tokens: int | None = field(
        default=None,
        metadata=_help("max_new_tokens for requests that set none; unset: fill the context"),
    )
    fixed_output_tokens: int | None = field(
        default=None,
        metadata=_help("always generate this many tokens (capped by max_new_tokens)"),
    )
    reply: str = field(
        default="",
        metadata=_help(
            "answer every request with this text, its words as the tokens (empty: random words)"
        ),
    )
    error_rate: float = field(
        default=0.0, metadata=_help("fraction of requests failing mid-stream (generation error)")
    )
    stall_ms: float = field(
        default=0.0, metadata=_help("extra stall before each request's first token, ms")
    )
    seed: int = field(
        default=0, metadata=_help("sampling seed for requests that set none; seeds error_rate")
    )

    def __post_init__(self) -> None:
        """Reject settings that cannot describe a server."""
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError("max_input_tokens must be < max_total_tokens")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be within [0, 1]")
        if self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be >= 1")
        if min(self.ttft_ms, self.prefill_ms_per_token, self.itl_ms, self.stall_ms) < 0:
            raise ValueError("latencies must be >= 0")
        for name in ("default_max_new_tokens", "fixed_output_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
