"""`python -m bench.token_path SIM_URL REDIS_URL`: the worker's token path alone, on threads and
on the stream loop, in this process: what a relayed token costs without Celery or Postgres.

`--clients` threads each run `--rounds` streams of the simulator's /generate_stream one after
the other, as a worker's generations do: every token goes to a real Redis through the
worker's `TokenPublisher` (fenced writes of the job's events). `threads`: the thread reads its
stream (the lean reader) and flushes as it reads (`add_token`); `loop`: the thread hands the
stream to a `StreamEngine` and waits for its end, as workers/generate.py does. Each mode runs
in turn, alternately; one JSON line a run: CPU seconds of this process over the tokens relayed.
Start the simulator with the latencies to measure (`inferq sim --ttft-ms 50 --itl-ms 10`).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid

import click
from huggingface_hub import InferenceClient

from inferq.events import PUBLISH_SCRIPT, script_keys
from inferq.lifecycle import Claim
from inferq.protocol import JobInput, JobParams
from inferq.redis_clients import sync_client
from workers.backends.base import GenerationRequest
from workers.backends.tgi import TextGenerationStream
from workers.engine import StreamEngine
from workers.publisher import FlushPace, TokenPublisher


class _Sink:
    def __init__(self, publisher: TokenPublisher, max_tokens: int) -> None:
        self.publisher = publisher
        self.max_tokens = max_tokens
        self.count = 0

    def ending(self) -> None:
        return None  # the job's end is the caller's

    def took(self, deltas: list[str], now: float) -> None:
        self.publisher.extend(deltas)
        self.count += len(deltas)


def _run(
    mode: str, sim_url: str, redis_url: str, clients: int, rounds: int, tokens: int
) -> dict[str, object]:
    pace = FlushPace(0.02, 400.0, 0.1)
    client = sync_client(redis_url, clients + 8)
    script = client.register_script(PUBLISH_SCRIPT)
    engine = StreamEngine(redis_url, pace) if mode == "loop" else None
    if engine is not None:
        engine.start()
    relayed, jobs, lock = [0], [], threading.Lock()

    def one(index: int) -> None:
        for round_ in range(rounds):
            job_id = str(uuid.uuid4())
            params = JobInput(prompt="-"), JobParams(max_tokens=tokens)
            now = dt.datetime.now(dt.UTC)
            claim = Claim(uuid.uuid4(), uuid.uuid4(), 1, "sim", *params, now, None)
            publisher = TokenPublisher(
                script, job_id, maxlen=1000, ttl=60, pace=pace, flush_max_tokens=16, claim=claim
            )
            request = GenerationRequest(
                prompt=f"token path {index} {round_}",
                messages=None,
                max_tokens=tokens,
                seed=index * 1000 + round_,
            )
            stream = TextGenerationStream(
                InferenceClient(model=sim_url, api_key="-", timeout=30), request
            )
            count = 0
            with pace.streaming():
                if engine is not None:
                    lean = stream.lean_request()
                    assert lean is not None, "the simulator is served over plain HTTP"
                    sink = _Sink(publisher, tokens)
                    engine.relay(stream, lean, 30, sink).wait()
                    count = sink.count
                else:
                    for delta in stream:
                        publisher.add_token(delta)
                        count += 1
                publisher.send([], final=True)  # the pending tokens, as a job's closing write
            stream.close()
            with lock:
                relayed[0] += count
                jobs.append(job_id)

    started, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - started
    if engine is not None:
        engine.stop()
    client.delete(*(key for job_id in jobs for key in script_keys(job_id)))
    client.close()
    return {
        "mode": mode,
        "tokens": relayed[0],
        "cpu_s": round(cpu_s, 3),
        "wall_s": round(wall_s, 2),
        "cpu_us_per_token": round(cpu_s / max(relayed[0], 1) * 1e6, 1),
    }


@click.command()
@click.argument("sim_url")
@click.argument("redis_url")
@click.option("--clients", default=64, show_default=True)
@click.option("--rounds", default=8, show_default=True)
@click.option("--tokens", default=64, show_default=True)
@click.option("--repeat", default=2, show_default=True, help="runs of each mode, alternately")
def main(sim_url: str, redis_url: str, clients: int, rounds: int, tokens: int, repeat: int) -> None:
    for _ in range(repeat):
        for mode in ("threads", "loop"):
            click.echo(json.dumps(_run(mode, sim_url, redis_url, clients, rounds, tokens)))


if __name__ == "__main__":
    main()
