"""Workers facing faulty backends and each other: through the real stack and the simulator."""

from __future__ import annotations

import json
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from inferq import lifecycle
from inferq.db import make_sync_engine
from inferq.events import (
    PUBLISH_SCRIPT,
    Event,
    EventType,
    finish_reason_of,
    stream_key,
)
from inferq.lifecycle import Outcome
from inferq.models import JobStatus
from inferq.processes import Child
from inferq.protocol import ResetData
from inferq.queue import Enqueue, Enqueuer, make_producer_app
from inferq.registry import queue_name, queue_prefix_of
from inferq.settings import Settings
from tests.conftest import Platform, Sim, _start_sim, submit, wait_for
from tests.servers import redis_client
from tests.sse import Transcript, read
from workers.publisher import FlushPace, TokenPublisher

# --- a backend stream that ends early, or cannot be read ------------------------------------


def _requests(sim: Sim) -> int:
    return int(sim.state()["total_requests"])


def _chat_expected(sim: Sim, messages: list[dict[str, str]], max_tokens: int, seed: int) -> str:
    body = {"messages": messages, "max_tokens": max_tokens, "seed": seed}
    reply = httpx.post(f"{sim.url}/v1/chat/completions", json=body, timeout=30).json()
    return str(reply["choices"][0]["message"]["content"])


@pytest.mark.parametrize("mode", ["cut", "abort"])
def test_a_prompt_stream_ending_early_is_retried_not_stored_as_a_success(
    platform: Platform, http: httpx.Client, mode: str
) -> None:
    sim = platform.sims["faulty"]
    prompt = f"end early: {mode}"
    expected = sim.generate(prompt, 24, seed=3)
    before = _requests(sim)
    sim.fault(mode, count=1)
    job = submit(http, model="faulty", prompt=prompt, max_tokens=24, seed=3)
    transcript = read(http, job["id"], Transcript())
    done = wait_for(http, job["id"])
    assert done["status"] == "succeeded", done
    assert done["output"] == expected["generated_text"]
    assert done["finish_reason"] == finish_reason_of(expected["details"]["finish_reason"])
    assert _requests(sim) - before == 2  # the early end, then the whole generation
    assert transcript.output() == done["output"]


@pytest.mark.parametrize("mode", ["cut", "abort"])
def test_a_chat_stream_ending_early_is_retried_not_stored_as_a_success(
    platform: Platform, http: httpx.Client, mode: str
) -> None:
    sim = platform.sims["faulty"]
    messages = [{"role": "user", "content": f"chat that ends early: {mode}"}]
    expected = _chat_expected(sim, messages, 24, seed=5)
    before = _requests(sim)
    sim.fault(mode, count=1)
    job = submit(http, model="faulty", messages=messages, max_tokens=24, seed=5)
    done = wait_for(http, job["id"])
    assert done["status"] == "succeeded", done
    assert done["output"] == expected
    assert done["finish_reason"] != "abort"
    assert _requests(sim) - before == 2


def test_nul_in_the_output_is_replaced_in_the_stream_and_the_stored_output(
    platform: Platform, http: httpx.Client
) -> None:
    sim = platform.sims["faulty"]
    sim.fault("nul", count=1)
    job = submit(http, model="faulty", prompt="emit a nul", max_tokens=12, seed=9)
    transcript = read(http, job["id"], Transcript())
    done = wait_for(http, job["id"])
    expected = sim.generate("emit a nul", 12, seed=9)["generated_text"]
    first, rest = expected.split(" ", 2)[1], expected.split(" ", 2)[2:]
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1
    assert done["output"] == " ".join(["", first + "\ufffd", *rest])
    assert transcript.output() == done["output"]


def test_an_unreadable_stream_fails_once_as_a_backend_error(
    platform: Platform, http: httpx.Client
) -> None:
    sim = platform.sims["faulty"]
    before = _requests(sim)
    sim.fault("garbage", count=1)
    job = submit(http, model="faulty", prompt="unreadable", max_tokens=16, seed=2)
    transcript = read(http, job["id"], Transcript())
    done = wait_for(http, job["id"])
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "backend_error"
    assert "could not be read" in done["error"]["message"]
    assert done["attempts"] == 1
    assert _requests(sim) - before == 1
    assert transcript.of_type("error")[-1]["type"] == "backend_error"
    assert transcript.output() == done["output"]


def test_a_job_failing_after_tokens_is_charged_for_them(
    platform: Platform, http: httpx.Client
) -> None:
    platform.sims["faulty"].fault("garbage", count=1)  # fails after three tokens
    job = submit(http, model="faulty", prompt="charged all the same", max_tokens=16, seed=3)
    done = wait_for(http, job["id"])
    assert done["status"] == "failed", done
    assert done["output"]
    usage = done["usage"]
    assert usage["output_tokens"] > 0
    assert usage["input_tokens"] > 0  # estimated: the stream never reported it
    cost = (usage["input_tokens"] * 0.25 + usage["output_tokens"] * 1.25) / 1e6
    assert usage["cost_usd"] == pytest.approx(cost) and cost > 0


# --- what tenants are told --------------------------------------------------------------------


def test_a_backend_that_is_down_is_reported_without_its_address(
    platform: Platform, http: httpx.Client
) -> None:
    done = wait_for(http, submit(http, model="down", prompt="where are you", max_tokens=4)["id"])
    assert done["status"] == "failed"
    message = done["error"]["message"]
    assert "unreachable" in message
    assert "127.0.0.1" not in message and "http" not in message.lower(), message
    # The operator still gets the whole story.
    models = tomllib.loads(Path(platform.env["INFERQ_MODELS_FILE"]).read_text())
    url = models["models"]["down"]["url"]
    _wait_for_log(platform, "worker", lambda e: e["level"] == "WARNING" and url in e["message"])


# --- a message for a job this deployment does not hold --------------------------------------


def _log_entries(platform: Platform, name: str) -> list[dict[str, Any]]:
    entries = []
    for line in (platform.logs / f"{name}.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    return entries


def _wait_for_log(
    platform: Platform, name: str, match: Any, timeout: float = 20.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [entry for entry in _log_entries(platform, name) if match(entry)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no such line in {name}.log")
        time.sleep(0.2)


def test_a_job_id_unknown_to_the_database_is_logged_as_an_error(platform: Platform) -> None:
    stranger = str(uuid.uuid4())
    settings = Settings(redis_url=platform.redis_url, database_url=platform.database_url)
    enqueuer = Enqueuer(make_producer_app(settings))
    broker = redis_client(platform.redis_url)
    try:
        queue = queue_name(queue_prefix_of(settings), "sim")
        enqueuer.enqueue(broker, [Enqueue(stranger, queue)])
    finally:
        enqueuer.close()
        broker.close()
    entry = _wait_for_log(
        platform, "worker", lambda e: e.get("job_id") == stranger and e["level"] == "ERROR"
    )
    assert stranger in entry["message"]


# --- a worker of its own, on a simulator of its own -------------------------------------------


@dataclass
class Lonely:
    """The `lonely` model served by a worker with short leases and a short stall bound."""

    sim: Sim
    worker: Child


LONELY_MODELS = """
[models.lonely]
backend = "tgi"
url = "{url}"
max_tokens = 400
"""


@pytest.fixture(scope="module")
def lonely(platform: Platform) -> Iterator[Lonely]:
    sim = _start_sim("lonely", platform.logs, platform.env, "--ttft-ms", "5", "--itl-ms", "25")
    models = platform.logs / "lonely-models.toml"
    models.write_text(LONELY_MODELS.format(url=sim.url))
    worker = platform.worker(
        "lonely",
        "lonely",
        concurrency=4,
        INFERQ_MODELS_FILE=str(models),
        INFERQ_LEASE_SECONDS="6",
        INFERQ_STALL_SECONDS="2",
        INFERQ_BACKEND_TIMEOUT_SECONDS="30",
    )
    yield Lonely(sim, worker)
    sim.clear_faults()
    worker.stop()
    sim.process.stop()


def _stream(platform: Platform, job_id: str) -> list[Event]:
    redis = redis_client(platform.redis_url)
    try:
        entries = redis.xrange(stream_key(job_id))
    finally:
        redis.close()
    return [Event.from_entry(entry_id, fields) for entry_id, fields in entries]


def _wait_until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_a_worker_that_lost_its_claim_writes_nothing_after_the_new_owners_reset(
    platform: Platform, http: httpx.Client, lonely: Lonely
) -> None:
    job = submit(http, model="lonely", prompt="two owners", max_tokens=300, seed=4)
    job_id = job["id"]
    tokens = lambda: [e for e in _stream(platform, job_id) if e.type is EventType.token]  # noqa: E731
    _wait_until(lambda: len(tokens()) >= 5)
    engine = make_sync_engine(platform.database_url, pool_size=1)
    redis = redis_client(platform.redis_url)
    try:
        # Take the job over as a second worker would once the first one's lease lapsed.
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE jobs SET lease_expires_at = now() - interval '1 s' WHERE id = :id"),
                {"id": job_id},
            )
            claim = lifecycle.claim(conn, uuid.UUID(job_id), "heir", 60, 3)
        assert claim is not None and claim.attempt == 2
        heir = TokenPublisher(
            redis.register_script(PUBLISH_SCRIPT),
            job_id,
            maxlen=100_000,
            ttl=600,
            pace=FlushPace(0.02, 400, 0.1),
            flush_max_tokens=16,
            claim=claim,
        )
        heir.send([Event.of(ResetData(attempt=2))])
        # The first worker streams a token every 25 ms; give it time to try to write more.
        time.sleep(3)
        events = _stream(platform, job_id)
        resets = [i for i, e in enumerate(events) if e.type is EventType.reset]
        assert resets, "the heir's reset is in the stream"
        after = events[resets[-1] + 1 :]
        assert after == [], f"the first worker wrote after the reset: {after[:3]}"
        _wait_for_log(
            platform,
            "worker-lonely",
            lambda e: e.get("job_id") == job_id and "lease lost" in e["message"],
        )
        outcome = Outcome(JobStatus.succeeded, output="heir", finish_reason="length")
        with engine.connect() as conn:
            assert lifecycle.finish(conn, claim, outcome)
            conn.commit()
        heir.add_token("heir")
        heir.send(Outcome(JobStatus.succeeded, finish_reason="length").closing_events(), final=True)
    finally:
        redis.close()
        engine.dispose()
    stored = wait_for(http, job_id)
    assert stored["status"] == "succeeded" and stored["attempts"] == 2
    assert read(http, job_id, Transcript()).output() == "heir"


def test_a_hung_backend_loses_its_lease_and_the_job_runs_again(
    platform: Platform, http: httpx.Client, lonely: Lonely
) -> None:
    # The first request hangs for a minute: the connection stays open, with keep-alives
    # every 15 s and no token, so the client's timeout never fires.
    httpx.post(
        f"{lonely.sim.url}/sim/faults",
        json={"mode": "stall", "count": 1, "stall_ms": 60_000},
        timeout=5,
    ).raise_for_status()
    job = submit(http, model="lonely", prompt="hang on", max_tokens=10, seed=8)
    done = wait_for(http, job["id"], timeout=40)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    _wait_for_log(
        platform,
        "worker-lonely",
        lambda e: e.get("job_id") == job["id"] and "no progress" in e["message"],
    )
