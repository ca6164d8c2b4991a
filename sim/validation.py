"""Request validation in TGI's order and wording (`router/src/validation.rs`)."""

from __future__ import annotations

from dataclasses import dataclass

from sim.config import SimConfig
from sim.errors import invalid
from sim.model import count_tokens
from sim.schemas import GenerateParameters

MAX_BEST_OF = 2
MAX_TOP_N_TOKENS = 5
# TGI generates at most this many tokens per pass when max_new_tokens is unset.
DEFAULT_GENERATION_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class ValidRequest:
    """A request that passed validation, with its lengths resolved."""

    prompt: str
    input_length: int
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: int
    sampling: bool


def validate(
    prompt: str, params: GenerateParameters, config: SimConfig, *, stream: bool
) -> ValidRequest:
    """Check a generate request as TGI would; raise a validation `SimError` if it fails."""
    if stream:
        _check_stream_only(params)
    else:
        _check_best_of(params)
    _check_sampling(params)
    _check_limits(prompt, params, config)
    input_length = _input_length(prompt, params)
    max_new_tokens = _max_new_tokens(params, input_length, config)
    return ValidRequest(
        prompt=prompt,
        input_length=input_length,
        max_new_tokens=max_new_tokens,
        stop=tuple(params.stop),
        seed=config.seed if params.seed is None else params.seed,
        sampling=params.sampling,
    )


def _check_stream_only(params: GenerateParameters) -> None:
    if (params.best_of or 1) != 1:
        raise invalid("`best_of` != 1 is not supported when streaming tokens")
    if params.decoder_input_details:
        raise invalid("`decoder_input_details` == true is not supported when streaming tokens")


def _check_best_of(params: GenerateParameters) -> None:
    best_of = params.best_of or 1
    if best_of > MAX_BEST_OF:
        raise invalid(f"`best_of` must be > 0 and <= {MAX_BEST_OF}. Given: {best_of}")
    if best_of > 1 and not params.sampling:
        raise invalid("you must use sampling when `best_of` is > 1")


def _check_sampling(params: GenerateParameters) -> None:
    if params.temperature is not None and params.temperature <= 0:
        raise invalid("`temperature` must be strictly positive")
    if params.repetition_penalty is not None and params.repetition_penalty <= 0:
        raise invalid("`repetition_penalty` must be strictly positive")
    if params.frequency_penalty is not None and not -2.0 <= params.frequency_penalty <= 2.0:
        raise invalid("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if params.top_p is not None and not 0.0 < params.top_p < 1.0:
        raise invalid("`top_p` must be > 0.0 and < 1.0")
    if params.typical_p is not None and not 0.0 < params.typical_p < 1.0:
        raise invalid("`typical_p` must be > 0.0 and < 1.0")
    if params.top_k is not None and params.top_k <= 0:
        raise invalid("`top_k` must be strictly positive")


def _check_limits(prompt: str, params: GenerateParameters, config: SimConfig) -> None:
    if params.max_new_tokens == 0:
        raise invalid("`max_new_tokens` must be strictly positive")
    if len(params.stop) > config.max_stop_sequences:
        raise invalid(
            f"`stop` supports up to {config.max_stop_sequences} stop sequences. "
            f"Given: {len(params.stop)}"
        )
    if (params.best_of or 1) > 1 and params.seed is not None:
        raise invalid("`seed` must not be set when `best_of` > 1")
    if params.top_n_tokens is not None and params.top_n_tokens > MAX_TOP_N_TOKENS:
        raise invalid(
            f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}. Given: {params.top_n_tokens}"
        )
    if not prompt:
        raise invalid("`inputs` cannot be empty")
    truncate = params.truncate
    if truncate is not None and not 0 < truncate <= config.max_input_tokens:
        raise invalid(
            f"`truncate` must be strictly positive and less than {config.max_input_tokens}. "
            f"Given: {truncate}"
        )


def _input_length(prompt: str, params: GenerateParameters) -> int:
    length = count_tokens(prompt)
    return length if params.truncate is None else min(length, params.truncate)


def _max_new_tokens(params: GenerateParameters, input_length: int, config: SimConfig) -> int:
    """Resolve `max_new_tokens` and check the token budget (MaxTotalTokens, then InputLength)."""
    max_new = params.max_new_tokens
    if max_new is None:
        room = max(config.max_total_tokens - input_length, 0)
        max_new = config.default_max_new_tokens or min(room, DEFAULT_GENERATION_LENGTH)
    if input_length + max_new > config.max_total_tokens:
        raise invalid(
            f"`inputs` tokens + `max_new_tokens` must be <= {config.max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {max_new} `max_new_tokens`"
        )
    if input_length > config.max_input_tokens:
        raise invalid(
            f"`inputs` must have less than {config.max_input_tokens} tokens. Given: {input_length}"
        )
    return max(max_new, 1)
