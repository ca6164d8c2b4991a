"""Fit a job's input into its model's context window.

Chat messages that do not fit with `max_tokens` lose their oldest turns after the system
message until they do; the last user message always stays. A prompt, or a conversation whose
kept core alone does not fit, is refused before any job exists.

Counting asks the backend's tokenizer only when the input might not fit: an input whose
bytes (an upper bound of its tokens) fit with room to spare is taken as it is, with no call.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from api.errors import ApiError
from inferq.protocol import ChatMessage, JobInput
from inferq.registry import ModelSpec
from inferq.tokens import Count, TokenCounter, upper_bound

# Chat templates wrap each message in role markers, and cue the reply: a few tokens each
# covers the common templates (ChatML takes 4 per message and 3 for the cue).
MESSAGE_OVERHEAD = 4
REPLY_OVERHEAD = 3


class ContextLengthExceeded(ApiError):
    status = 422
    type = "context_length_exceeded"


@dataclass(frozen=True, slots=True)
class Fitted:
    input: JobInput
    dropped_messages: int = 0


async def fit_context(
    counter: TokenCounter, spec: ModelSpec, job_input: JobInput, max_tokens: int
) -> Fitted:
    """The input to send, trimmed to fit; raise `ContextLengthExceeded` if it cannot fit."""
    budget = spec.context_tokens - max_tokens
    if job_input.messages is None:
        await _check_prompt(counter, spec, job_input.prompt or "", budget, max_tokens)
        return Fitted(job_input)
    messages = job_input.messages
    if _size(messages, [upper_bound(m.content) for m in messages]) <= budget:
        return Fitted(job_input)
    counts = await asyncio.gather(*(counter.count(spec, m.content) for m in messages))
    kept = keep_indices(
        [m.role for m in messages], [c.tokens + MESSAGE_OVERHEAD for c in counts], budget
    )
    if kept is None:
        core = _core(messages)
        needed = _size([messages[i] for i in core], [counts[i].tokens for i in core])
        raise _exceeded(spec, needed, max_tokens, counts, "the system and last user messages")
    trimmed = [messages[i] for i in kept]
    return Fitted(JobInput(messages=trimmed), dropped_messages=len(messages) - len(trimmed))


def keep_indices(roles: list[str], sizes: list[int], budget: int) -> list[int] | None:
    """Indices of the messages kept: the oldest after a leading system message are dropped
    until the rest, plus the reply cue, fit `budget`; None if the core alone does not."""
    first, last_user = _bounds(roles)
    total = sum(sizes) + REPLY_OVERHEAD
    drop = first
    while total > budget and drop < last_user:
        total -= sizes[drop]
        drop += 1
    if total > budget:
        return None
    return [*range(first), *range(drop, len(roles))]


def _bounds(roles: list[str]) -> tuple[int, int]:
    """How many leading messages always stay (a system message), and the last user message."""
    first = 1 if roles and roles[0] == "system" else 0
    last_user = max((i for i, role in enumerate(roles) if role == "user"), default=len(roles) - 1)
    return first, last_user


def _core(messages: list[ChatMessage]) -> list[int]:
    first, last_user = _bounds([m.role for m in messages])
    return [*range(first), *range(last_user, len(messages))]


def _size(messages: list[ChatMessage], tokens: list[int]) -> int:
    return sum(tokens) + MESSAGE_OVERHEAD * len(messages) + REPLY_OVERHEAD


async def _check_prompt(
    counter: TokenCounter, spec: ModelSpec, prompt: str, budget: int, max_tokens: int
) -> None:
    if upper_bound(prompt) <= budget:
        return
    count = await counter.count(spec, prompt)
    if count.tokens > budget:
        raise _exceeded(spec, count.tokens, max_tokens, [count], "the prompt")


def _exceeded(
    spec: ModelSpec, needed: int, max_tokens: int, counts: list[Count], what: str
) -> ContextLengthExceeded:
    how = "counted" if all(c.exact for c in counts) else "estimated"
    return ContextLengthExceeded(
        f"model {spec.name!r} has a context of {spec.context_tokens} tokens; {what}: "
        f"{needed} tokens ({how}), plus max_tokens {max_tokens}, is {needed + max_tokens}"
    )
