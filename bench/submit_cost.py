"""What routing (`auto`) and token counting add to a submit, at one client.

    python -m bench.submit_cost [--database-url URL] [--redis-url URL] [--rounds 400]

Starts a simulator and one API on a fresh database; the jobs stay queued (no worker serves
their models), so only the submit path is timed. One client sends, in turn, the same short
prompt to a named model and to `auto`, then conversations longer than the model's context
window to `auto` (beside the same conversations to a model whose window they fit, so need
no count): each turn adds a new message the backend's tokenizer must count (its
earlier messages' counts are remembered), and the same conversation again (every count
remembered). The kinds alternate, so a slower stretch of the machine hits each alike.
Prints the p50 and p95 of each kind and what it adds to its baseline's p50 (the short prompt
to a named model, or the long chat that fits).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import httpx

from bench.cache_hit import platform
from bench.servers import add_server_arguments

MODELS = """
[models.sim]
backend = "tgi"
url = "{sim}"

[models.chat]
backend = "tgi"
url = "{sim}"
context_tokens = 1024

[models.chat-code]
backend = "tgi"
url = "{sim}"
context_tokens = 1024

[models.chat-wide]
backend = "tgi"
url = "{sim}"
context_tokens = 8192

[routing]
default = "chat"

[[routing.rules]]
model = "chat-code"
keywords = ["python", "traceback", "stack trace"]

[[routing.rules]]
model = "chat"
max_input_tokens = 2000
"""

PROMPT = "Explain in two sentences what a message queue is for. " * 4
TURN = "Tell me more about how workers share the queue and what happens on a crash. " * 5


def _conversation(round_: int) -> list[dict[str, str]]:
    """A system message and twelve turns (about 5,000 characters), the last one new."""
    messages = [{"role": "system", "content": "You are a concise assistant."}]
    for turn in range(12):
        messages.append({"role": "user", "content": f"{TURN} (turn {turn})"})
        messages.append({"role": "assistant", "content": f"{TURN} (answer {turn})"})
    messages.append({"role": "user", "content": f"And what of round {round_}?"})
    return messages


KINDS: dict[str, Any] = {
    "named model, prompt": lambda i: {"model": "chat", "prompt": f"{PROMPT} {i}"},
    "auto, prompt": lambda i: {"model": "auto", "prompt": f"{PROMPT} {i}"},
    "named wide model, long chat (fits, not counted)": lambda i: {
        "model": "chat-wide",
        "messages": _conversation(i),
    },
    "auto, long chat, new turn counted": lambda i: {"model": "auto", "messages": _conversation(i)},
    "auto, long chat, counts remembered": lambda i: {
        "model": "auto",
        "messages": _conversation(-1),
    },
}


LONG_BASELINE = "named wide model, long chat (fits, not counted)"


async def measure(url: str, key: str, rounds: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        for i in range(-20, rounds):  # the first 20 rounds warm up and are not kept
            for kind, body in KINDS.items():
                payload = {**body(i), "max_tokens": 64, "cache": False}
                start = time.perf_counter()
                response = await client.post("/v1/jobs", json=payload)
                elapsed = (time.perf_counter() - start) * 1000
                if response.status_code != 202:
                    raise RuntimeError(f"{kind}: {response.status_code} {response.text}")
                if i >= 0:
                    times[kind].append(elapsed)
    result: dict[str, Any] = {"rounds": rounds}
    for kind, values in times.items():
        baseline = "named model, prompt" if "prompt" in kind else LONG_BASELINE
        base = statistics.median(times[baseline])
        cuts = statistics.quantiles(values, n=100)
        result[kind] = {
            "p50_ms": round(cuts[49], 2),
            "p95_ms": round(cuts[94], 2),
            "added_p50_ms": round(statistics.median(values) - base, 2),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--rounds", type=int, default=400, help="submits of each kind")
    args = parser.parse_args()
    with platform(args.database_url, args.redis_url, MODELS) as (url, key, sim_url):
        result = asyncio.run(measure(url, key, args.rounds))
        state = httpx.get(f"{sim_url}/sim/state", timeout=5).json()
    result["backend_tokenize_calls"] = state.get("tokenize_requests", state.get("total_requests"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
