"""The floor of a relayed token's CPU: a bare client of the simulator's stream, in a process of its
own so that its CPU is counted apart.

`python -m bench.bare_reader SIM_URL --clients C --rounds R --tokens N` runs C closed-loop
clients of /generate_stream (the bench's lean httptools client, one `json.loads` an event),
R requests each, and prints one JSON line: CPU seconds of the reading (imports and start-up
left out), tokens read, wall seconds, errors. A worker relays what this reads, and more: it
also publishes every token and keeps the job's records, so its CPU per token over this one
says how much the relaying costs beyond reading.
"""

from __future__ import annotations

import asyncio
import json
import time

import click
import uvloop

from bench.clients import Request, direct


async def _read(url: str, clients: int, rounds: int, tokens: int) -> tuple[int, int]:
    read, errors = 0, 0

    async def client(index: int) -> None:
        nonlocal read, errors
        for round_ in range(rounds):
            request = Request(f"bare reader {index} {round_}", tokens, seed=index * 1000 + round_)
            timing = await direct(url, request)
            if timing.ok:
                read += timing.tokens
            else:
                errors += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return read, errors


@click.command()
@click.argument("url")
@click.option("--clients", default=64, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--tokens", default=64, show_default=True)
def main(url: str, clients: int, rounds: int, tokens: int) -> None:
    started, cpu = time.perf_counter(), time.process_time()
    read, errors = uvloop.run(_read(url, clients, rounds, tokens))
    figures = {
        "cpu_s": time.process_time() - cpu,
        "tokens": read,
        "wall_s": time.perf_counter() - started,
        "errors": errors,
    }
    click.echo(json.dumps(figures))


if __name__ == "__main__":
    main()
