"""The judge, its pure parts: which jobs are sampled, the judge's prompt, reading its reply.

A judge's job is an ordinary job (same table, same queue, same workers) that names the job it
scores in `judge_of`. It belongs to the reserved tenant `JUDGE_TENANT`, which no key can be
made for: no tenant lists it, and it counts in no tenant's stats or budget (it has no key, so
it reserves and settles no limits). beat makes and reads these jobs (workers/judge.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from inferq.db import uuid7
from inferq.lifecycle import REDACT_PARAM
from inferq.models import JobStatus
from inferq.protocol import ChatMessage, JobInput, JobParams
from inferq.registry import ModelSpec
from inferq.routing import JudgeTable

# Tenants whose names start so are the platform's own: key creation refuses them.
RESERVED_TENANT_PREFIX = "inferq:"
JUDGE_TENANT = RESERVED_TENANT_PREFIX + "judge"
MAX_RATIONALE_CHARS = 2000
# Of the judge's context, what the judged texts may fill, in characters per token: a low
# estimate of English text's (about 4), so that the prompt fits with room for the template.
CHARS_PER_TOKEN = 3
TEMPLATE_RESERVE_TOKENS = 200
ELIDED = "\n[…]\n"

# A digit 1-5 standing alone: not part of 15, 4.5 or 0.3 (a full stop after it is fine).
_SCORE_LINE = re.compile(r"score\W{0,3}\s*(?:is\s*)?\**\s*([1-5])(?!\d|\.\d)", re.IGNORECASE)
_OUT_OF_FIVE = re.compile(r"(?<![\d.])([1-5])\s*(?:/|out of)\s*5(?!\d|\.\d)", re.IGNORECASE)


def is_reserved_tenant(tenant: str) -> bool:
    return tenant.startswith(RESERVED_TENANT_PREFIX)


def sampled(job_id: uuid.UUID, rate: float) -> bool:
    """Whether the judge scores this job: decided by its id alone, so that a job seen by two
    passes (or two beats) gets the same answer, and about `rate` of all jobs are chosen."""
    if rate <= 0:
        return False
    draw = int.from_bytes(hashlib.sha256(job_id.bytes).digest()[:8], "big") / 2**64
    return draw < rate


def _shorten(text: str, limit: int) -> str:
    """`text` within `limit` characters: its start and its end, the middle elided."""
    if len(text) <= limit:
        return text
    half = max(0, (limit - len(ELIDED)) // 2)
    return text[:half] + ELIDED + text[len(text) - half :]


def render(template: str, request: str, answer: str, model: str, budget_chars: int) -> str:
    """The judge's prompt: the template's {input}, {output} and {model} filled in, the two
    texts shortened to share `budget_chars`. Other braces stay as written (a JSON example)."""
    each = max(200, budget_chars // 2)
    values = {"{input}": _shorten(request, each), "{output}": _shorten(answer, each)}
    values["{model}"] = model
    # One pass, so that a text holding "{output}" is not filled in again.
    pattern = re.compile("|".join(re.escape(name) for name in values))
    return pattern.sub(lambda found: values[found.group()], template)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The judge's reply read: a score 1-5 and a rationale, or the error that made it
    unreadable (the rationale then keeps the start of the reply)."""

    score: int | None
    rationale: str | None
    error: str | None = None


def _from_json(reply: str) -> Verdict | None:
    """The first JSON object in the reply that holds a score."""
    decoder = json.JSONDecoder()
    for start in (i for i, char in enumerate(reply) if char == "{"):
        try:
            value, _ = decoder.raw_decode(reply, start)
        except ValueError:
            continue
        if isinstance(value, dict) and "score" in value:
            score = _score(value["score"])
            if score is None:
                return Verdict(None, _bounded(reply), f"score {value['score']!r} is not 1-5")
            rationale = value.get("rationale")
            text = rationale if isinstance(rationale, str) else None
            return Verdict(score, _bounded(text) if text else None)
    return None


def _score(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit():
            return None
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 1 <= value <= 5:
        return value
    return None


def _bounded(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_RATIONALE_CHARS else text[: MAX_RATIONALE_CHARS - 1] + "…"


def parse(reply: str) -> Verdict:
    """Read the judge's reply: the JSON object the prompt asks for, else a "score: N" (or
    "N/5") in the text, the whole reply then being the rationale."""
    verdict = _from_json(reply)
    if verdict is not None:
        return verdict
    found = _SCORE_LINE.search(reply) or _OUT_OF_FIVE.search(reply)
    if found is not None:
        return Verdict(int(found.group(1)), _bounded(reply) or None)
    return Verdict(
        None,
        _bounded(reply) or None,
        'no score 1-5 in the judge\'s reply (neither {"score": N} nor "score: N")',
    )


def conversation(job_input: JobInput) -> str:
    """The request as the judge reads it: the prompt, or one `role: content` block per
    message; a redacted input (docs/quality.md) says so."""
    if job_input.messages is not None:
        return "\n\n".join(f"{m.role}: {m.content}" for m in job_input.messages)
    return job_input.prompt if job_input.prompt is not None else "(the request was not kept)"


@dataclass(frozen=True, slots=True)
class Judged:
    """What the judge is shown of a job."""

    id: uuid.UUID
    model: str
    input: dict[str, Any]
    output: str


def judge_job(judged: Judged, table: JudgeTable, spec: ModelSpec, redact: bool) -> dict[str, Any]:
    """The row of the judge's job for `judged`: greedy and seeded, so that a job judged twice
    gets the same verdict; `redact` clears its input when it ends, as for any job."""
    max_tokens = min(table.max_tokens, spec.max_tokens)
    budget = max(0, spec.context_tokens - max_tokens - TEMPLATE_RESERVE_TOKENS) * CHARS_PER_TOKEN
    request = conversation(JobInput.model_validate(judged.input))
    prompt = render(table.template, request, judged.output, judged.model, budget)
    params = JobParams(max_tokens=max_tokens, temperature=0, seed=0, cache=False).model_dump()
    if redact:
        params[REDACT_PARAM] = True
    return {
        "id": uuid7(),
        "tenant": JUDGE_TENANT,
        "api_key_id": None,
        "requested_model": spec.name,
        "model": spec.name,
        "status": JobStatus.queued.value,
        "priority": "batch",
        "input": JobInput(messages=[ChatMessage(role="user", content=prompt)]).stored(),
        "params": params,
        "metadata": {},
        "judge_of": judged.id,
    }
