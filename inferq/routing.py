"""The models file's [routing] and [judge] tables: which model `auto` runs on, and the judge.

A rule matches when every condition it states holds; the first rule that matches wins, else
the table's `default`. The input's length is the estimate ceil(characters / 4) (no tokenizer
is asked before the model is chosen); keywords match anywhere in the input's text (the prompt,
or every message's content), case-insensitively.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inferq.protocol import JobInput

AUTO = "auto"


class Rule(BaseModel):
    """One [[routing.rules]] entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    max_input_tokens: int | None = Field(None, gt=0)  # the input is shorter than this
    min_input_tokens: int | None = Field(None, ge=0)  # the input is at least this long
    keywords: list[str] | None = Field(None, min_length=1)  # any of them, case-insensitive

    @model_validator(mode="after")
    def _has_a_condition(self) -> Rule:
        if self.max_input_tokens is None and self.min_input_tokens is None and not self.keywords:
            raise ValueError("a rule needs max_input_tokens, min_input_tokens or keywords")
        return self

    def matches(self, tokens: int, text: str) -> bool:
        """`text` already lower-cased."""
        if self.max_input_tokens is not None and tokens >= self.max_input_tokens:
            return False
        if self.min_input_tokens is not None and tokens < self.min_input_tokens:
            return False
        return not self.keywords or any(word.lower() in text for word in self.keywords)


class RoutingTable(BaseModel):
    """The [routing] table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: str = Field(min_length=1)
    rules: list[Rule] = Field(default_factory=list)

    def models(self) -> list[str]:
        """Every model the table names, the default first."""
        return [self.default, *(rule.model for rule in self.rules)]

    def route(self, job_input: JobInput) -> str:
        tokens = job_input.estimated_tokens()
        text = input_text(job_input).lower()
        for rule in self.rules:
            if rule.matches(tokens, text):
                return rule.model
        return self.default


# The judge's prompt unless the [judge] table gives one: {input}, {output} and {model} are
# filled in; the reply asked for is what inferq.judge.parse reads first.
DEFAULT_JUDGE_PROMPT = """You are a strict reviewer of an AI assistant's answers.

The request:
<request>
{input}
</request>

The answer:
<answer>
{output}
</answer>

Rate how well the answer serves the request (correct, helpful, clear) from 1 (useless or \
wrong) to 5 (excellent). Reply with one JSON object and nothing else:
{"score": <1-5>, "rationale": "<one short sentence>"}"""
JUDGE_PLACEHOLDERS = frozenset({"input", "output", "model"})
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class JudgeTable(BaseModel):
    """The [judge] table: the model that scores a sample of succeeded jobs (docs/quality.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    sample_rate: float = Field(ge=0, le=1)
    # The judge's prompt: {output} (the answer) is required; {input} and {model} may appear.
    prompt: str | None = Field(None, min_length=1)
    max_tokens: int = Field(256, gt=0)  # the judge's reply, capped by its model's max_tokens

    @field_validator("prompt")
    @classmethod
    def _known_placeholders(cls, prompt: str | None) -> str | None:
        if prompt is None:
            return None
        names = set(_PLACEHOLDER.findall(prompt))
        unknown = sorted(names - JUDGE_PLACEHOLDERS)
        if unknown:
            known = ", ".join(f"{{{n}}}" for n in sorted(JUDGE_PLACEHOLDERS))
            raise ValueError(f"unknown placeholder {{{unknown[0]}}} (known: {known})")
        if "output" not in names:
            raise ValueError("the prompt must show the answer: add {output}")
        return prompt

    @property
    def template(self) -> str:
        return self.prompt or DEFAULT_JUDGE_PROMPT


def input_text(job_input: JobInput) -> str:
    if job_input.messages is None:
        return job_input.prompt or ""
    return "\n".join(message.content for message in job_input.messages)
