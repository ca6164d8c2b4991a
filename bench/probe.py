"""How fast this machine is right now: a fixed piece of Python work, timed.

A shared virtual machine changes speed from one quarter of an hour to the next: here the
same submit phase gave 582 and 1,519 jobs/s on one API process twenty minutes apart, with
the same code. The bench times this work before each phase, while the platform is idle, so
that runs can be compared and a run taken while the machine was slow can be recognised.
"""

from __future__ import annotations

import json
import time

# A job's JSON round trip: the kind of work every request and every token costs.
_PAYLOAD = {
    "model": "stream",
    "prompt": "The quick brown fox jumps over the lazy dog. " * 4,
    "params": {"max_tokens": 64, "temperature": 0.7, "top_p": 0.9, "stop": ["\n\n"]},
    "usage": {"input_tokens": 40, "output_tokens": 64, "cost_usd": 0.0000415},
}
_ITERATIONS = 2000
_ROUNDS = 5


def speed_probe_ms() -> float:
    """Milliseconds for the fixed work, best of a few rounds (lower is faster)."""
    best = float("inf")
    for _ in range(_ROUNDS):
        started = time.perf_counter()
        for _ in range(_ITERATIONS):
            json.loads(json.dumps(_PAYLOAD))
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)
