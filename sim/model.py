"""The simulated language model: a word tokenizer and deterministic output.

A token is a whitespace-separated word. Output words come from a fixed vocabulary,
drawn by a PRNG seeded from (prompt, seed): the same prompt and seed always give the
same output, byte for byte, whether or not sampling was requested. The output length
is drawn first, so a larger `max_new_tokens` keeps the same leading words.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

EOS_ID = 2
EOS_TEXT = "</s>"
_FIRST_WORD_ID = 1000

_WORDS = """
the of and to in is was for on that with as by at from it his an were are which this be has had
not one but first new also or their its after two they been who more other all she time can year
would into her over some city when up game only three most may people world during between many
where such these there then about state through team out well both years while made film later
life being part under second use known before against school since called work music family used
high each area series found season water light river house number small large early best great
general place long same day history order left public several road point local north south west
east model token stream batch queue worker signal vector kernel memory cache layer window quiet
rapid bright gentle simple steady careful curious patient silver golden green blue
"""
_WORD = re.compile(r"\S+")
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(_WORDS.split()))


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token as TGI reports it."""

    id: int
    text: str
    logprob: float
    special: bool = False

    def as_dict(self) -> dict[str, object]:
        """TGI `Token` JSON object."""
        return {"id": self.id, "text": self.text, "logprob": self.logprob, "special": self.special}


@dataclass(frozen=True, slots=True)
class Plan:
    """The whole output of one generation, decided before the first token."""

    tokens: tuple[Token, ...]
    finish_reason: str

    @property
    def text(self) -> str:
        """Generated text: the non-special tokens, concatenated."""
        return "".join(token.text for token in self.tokens if not token.special)


def count_tokens(text: str) -> int:
    """Number of input tokens in `text` (at least one)."""
    return max(1, len(text.split()))


def tokenize(text: str) -> list[dict[str, object]]:
    """TGI `/tokenize`: one `{id, text, start, stop}` per word, offsets in bytes.

    The same words `count_tokens` counts, so a count from here matches `input_length`.
    """
    tokens: list[dict[str, object]] = []
    for match in _WORD.finditer(text):
        start = len(text[: match.start()].encode())
        word = match.group()
        tokens.append(
            {"id": _word_id(word), "text": word, "start": start, "stop": start + len(word.encode())}
        )
    return tokens


def render_chat(messages: Iterable[tuple[str, str]]) -> str:
    """Chat template: one `<|role|>` block per message, then the assistant cue."""
    body = "".join(f"<|{role}|>\n{content}\n" for role, content in messages)
    return body + "<|assistant|>\n"


def prefill_tokens(prompt: str) -> list[dict[str, object]]:
    """TGI `details.prefill`: the prompt's tokens; the first has no logprob."""
    words = prompt.split() or [""]
    rng = _rng(prompt, 0)
    return [
        {"id": _word_id(word), "text": word, "logprob": None if i == 0 else _logprob(rng)}
        for i, word in enumerate(words)
    ]


def plan_generation(
    prompt: str,
    seed: int,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    fixed_output_tokens: int | None = None,
    reply: str = "",
) -> Plan:
    """Decide every token of the output for (prompt, seed); a set `reply` is the output."""
    rng = _rng(prompt, seed)
    if reply:
        return _reply_plan(rng, reply, max_new_tokens)
    total = _output_length(rng, max_new_tokens, fixed_output_tokens)
    hits_limit = total == max_new_tokens
    words = _draw_words(rng, total if hits_limit else total - 1, stop)
    if words.stopped:
        return Plan(words.tokens, "stop_sequence")
    if hits_limit:
        return Plan(words.tokens, "length")
    return Plan((*words.tokens, Token(EOS_ID, EOS_TEXT, _logprob(rng), special=True)), "eos_token")


def _reply_plan(rng: random.Random, reply: str, max_new_tokens: int) -> Plan:
    """The fixed reply's words, as many as `max_new_tokens` allows (with eos, if room)."""
    words = reply.split()[:max_new_tokens]
    tokens = tuple(Token(_word_id(word), " " + word, _logprob(rng)) for word in words)
    if len(words) == max_new_tokens:
        return Plan(tokens, "length")
    return Plan((*tokens, Token(EOS_ID, EOS_TEXT, _logprob(rng), special=True)), "eos_token")


def _output_length(rng: random.Random, max_new_tokens: int, fixed: int | None) -> int:
    """Generated tokens, counting a closing eos token as TGI does."""
    words = rng.randint(max(1, max_new_tokens // 2), max_new_tokens)
    if fixed is not None:
        return min(fixed, max_new_tokens)
    # Finishing early spends one more token on eos, so keep at least one word.
    return words if words == max_new_tokens else words + 1


@dataclass(frozen=True, slots=True)
class _Words:
    tokens: tuple[Token, ...]
    stopped: bool


def _draw_words(rng: random.Random, count: int, stop: Sequence[str]) -> _Words:
    """Draw `count` word tokens, ending early at the first stop sequence."""
    tokens: list[Token] = []
    window = max((len(s) for s in stop), default=0)
    tail = ""
    for _ in range(count):
        word = VOCABULARY[rng.randrange(len(VOCABULARY))]
        tokens.append(Token(_word_id(word), " " + word, _logprob(rng)))
        if window:
            tail = (tail + " " + word)[-window:]
            if any(tail.endswith(s) for s in stop):
                return _Words(tuple(tokens), stopped=True)
    return _Words(tuple(tokens), stopped=False)


def _rng(prompt: str, seed: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _logprob(rng: random.Random) -> float:
    return -round(rng.expovariate(2.0), 4)


@functools.lru_cache(maxsize=16384)
def _word_id(word: str) -> int:
    digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
    return _FIRST_WORD_ID + int.from_bytes(digest, "big") % 30000
