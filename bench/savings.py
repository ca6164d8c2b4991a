"""What cost control saves: one workload, with and without routing, the cache and the window.

    python -m bench.savings [--database-url URL] [--redis-url URL] [--repeats 3]

Starts a simulator, one API and one worker serving two priced models, `small` (cheap, a
1,024-token window) and `large` (dear, 4,096 tokens). The same workload runs twice:

- **plain**: every request names `large` and bypasses the cache (`cache: false`): what a
  team pays with none of these features;
- **cost control**: every request names `auto` with the cache on: short questions route to
  `small`, code questions (a keyword) to `large`, and conversations longer than `small`'s
  window are trimmed to fit it.

The workload: short questions, each asked `--repeats` times with the same seed (a help desk's
frequent questions); code questions; long conversations. Prints, per run, the backend's
generate calls (the simulator's count), input and output tokens billed, cost, and failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from decimal import Decimal
from typing import Any

import httpx

from bench.cache_hit import platform
from bench.servers import add_server_arguments

MODELS = """
[models.small]
backend = "tgi"
url = "{sim}"
context_tokens = 1024
price_input_per_mtok = 0.15
price_output_per_mtok = 0.60

[models.large]
backend = "tgi"
url = "{sim}"
context_tokens = 4096
price_input_per_mtok = 3.00
price_output_per_mtok = 15.00

[routing]
default = "small"

[[routing.rules]]
model = "large"
keywords = ["python", "sql", "traceback"]
"""

QUESTIONS = [f"How do I reset my password for account type {n}?" for n in range(20)]
CODE = [f"Why does this python loop raise a KeyError at line {n}?" for n in range(15)]
TURN = "We talked about queues, workers, leases and retries; here is what I saw next. " * 12


def _long_chat(n: int) -> list[dict[str, str]]:
    """About 10,000 characters: over `small`'s window, inside `large`'s."""
    messages = [{"role": "system", "content": "You are a helpful support engineer."}]
    for turn in range(10):
        messages.append({"role": "user", "content": f"{TURN} (chat {n}, turn {turn})"})
        messages.append({"role": "assistant", "content": f"Noted (chat {n}, turn {turn})."})
    messages.append({"role": "user", "content": "So what should I do now?"})
    return messages


def workload(repeats: int) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    for _ in range(repeats):
        bodies += [{"prompt": q, "seed": 1, "temperature": 0} for q in QUESTIONS]
    bodies += [{"prompt": q, "seed": 1, "temperature": 0} for q in CODE]
    bodies += [{"messages": _long_chat(n), "seed": 1} for n in range(10)]
    return [{**body, "max_tokens": 48} for body in bodies]


async def run(url: str, key: str, bodies: list[dict[str, Any]], extra: dict[str, Any]) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    limit = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:

        async def one(body: dict[str, Any]) -> dict[str, Any]:
            async with limit:
                job = (await client.post("/v1/jobs", json={**body, **extra})).json()
                while job.get("status") in ("queued", "running"):
                    await asyncio.sleep(0.1)
                    job = (await client.get(f"/v1/jobs/{job['id']}")).json()
                return dict(job)

        # Repeats come after the first asking: the cache holds only complete answers.
        first = await asyncio.gather(*(one(b) for b in bodies[: len(QUESTIONS)]))
        rest = await asyncio.gather(*(one(b) for b in bodies[len(QUESTIONS) :]))
    jobs = first + rest
    usage = [job.get("usage") or {} for job in jobs]
    return {
        "jobs": len(jobs),
        "failed": sum(job.get("status") != "succeeded" for job in jobs),
        "cached": sum(bool(job.get("cached")) for job in jobs),
        "by_model": {m: sum(j.get("model") == m for j in jobs) for m in ("small", "large")},
        "dropped_messages": sum(job.get("dropped_messages") or 0 for job in jobs),
        "input_tokens": sum(u.get("input_tokens") or 0 for u in usage),
        "output_tokens": sum(u.get("output_tokens") or 0 for u in usage),
        "cost_usd": float(sum(Decimal(str(u.get("cost_usd") or 0)) for u in usage)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="askings of each short question")
    args = parser.parse_args()
    bodies = workload(args.repeats)
    result: dict[str, Any] = {}
    with platform(args.database_url, args.redis_url, MODELS, "small,large") as (url, key, sim):
        for label, model, extra in (
            ("plain", "large", {"cache": False}),
            ("cost control", "auto", {"cache": True}),
        ):
            before = httpx.get(f"{sim}/sim/state", timeout=5).json()["total_requests"]
            runs = [{**body, "model": model} for body in bodies]
            result[label] = asyncio.run(run(url, key, runs, extra))
            after = httpx.get(f"{sim}/sim/state", timeout=5).json()["total_requests"]
            result[label]["backend_calls"] = after - before
    plain, control = result["plain"], result["cost control"]
    result["saved"] = {
        "cost": f"{1 - control['cost_usd'] / plain['cost_usd']:.0%}",
        "backend_calls": f"{1 - control['backend_calls'] / plain['backend_calls']:.0%}",
        "input_tokens": f"{1 - control['input_tokens'] / plain['input_tokens']:.0%}",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
