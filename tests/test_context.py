"""Token counting through the backend's tokenizer, and fitting chat into the context window."""

from __future__ import annotations

import httpx
import psycopg

from api.jobs.context import REPLY_OVERHEAD, keep_indices
from inferq.registry import ModelSpec
from inferq.tokens import TokenCounter, estimate
from tests.conftest import Platform, submit, wait_for
from tests.servers import free_port

# The `tiny` model: a context of 64 tokens and max_tokens capped at 16.
TINY_CONTEXT = 64
TINY_MAX_TOKENS = 16


def _turn(i: int) -> str:
    return " ".join(f"turn{i}word{j}" for j in range(10))


def _long_conversation() -> list[dict[str, str]]:
    old = [{"role": "user" if i % 2 == 0 else "assistant", "content": _turn(i)} for i in range(6)]
    return [
        {"role": "system", "content": "Be brief."},
        *old,
        {"role": "user", "content": "What now?"},
    ]


def _job_input(platform: Platform, job_id: str) -> dict[str, object]:
    with psycopg.connect(platform.database_url.replace("+psycopg", "")) as db:
        row = db.execute("SELECT input FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return dict(row[0])


def test_keep_indices_drops_oldest_after_the_system_message() -> None:
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    sizes = [5, 10, 10, 10, 10, 5]
    budget = 5 + 10 + 5 + REPLY_OVERHEAD
    assert keep_indices(roles, sizes, budget) == [0, 4, 5]
    assert keep_indices(roles, sizes, 1000) == list(range(6))


def test_keep_indices_never_drops_the_last_user_message() -> None:
    roles = ["system", "user", "assistant", "user"]
    assert keep_indices(roles, [5, 10, 10, 50], 40) is None
    assert keep_indices(["user"], [5], 5 + REPLY_OVERHEAD) == [0]


def test_sim_tokenize_has_tgis_shape_and_matches_input_length(platform: Platform) -> None:
    url = platform.sims["fast"].url
    text = "héllo  world\nagain"
    tokens = httpx.post(f"{url}/tokenize", json={"inputs": text}, timeout=5).json()
    assert [set(t) for t in tokens] == [{"id", "text", "start", "stop"}] * 3
    assert [(t["text"], t["start"], t["stop"]) for t in tokens] == [
        ("héllo", 0, 6),
        ("world", 8, 13),
        ("again", 14, 19),
    ]
    raw = text.encode()
    assert all(raw[t["start"] : t["stop"]].decode() == t["text"] for t in tokens)
    assert all(isinstance(t["id"], int) for t in tokens)
    body = {"inputs": text, "parameters": {"max_new_tokens": 2}}
    generated = httpx.post(f"{url}/generate", json=body, timeout=30)
    assert generated.headers["x-prompt-tokens"] == str(len(tokens))


def test_sim_tokenize_rejects_a_body_without_inputs(platform: Platform) -> None:
    url = platform.sims["fast"].url
    response = httpx.post(f"{url}/tokenize", json={"text": "x"}, timeout=5)
    assert response.status_code == 422


async def test_counting_uses_the_backends_tokenizer_and_caches_it(platform: Platform) -> None:
    sim = platform.sims["fast"]
    spec = ModelSpec(name="counted", backend="tgi", url=sim.url)
    counter = TokenCounter()
    text = "one two three four five six seven"  # 7 tokens; the estimate says 9
    try:
        before = sim.state()["tokenize_requests"]
        first = await counter.count(spec, text)
        second = await counter.count(spec, text)
    finally:
        await counter.aclose()
    assert first.exact and first.tokens == 7
    assert second == first
    assert (counter.calls, counter.hits) == (1, 1)
    assert sim.state()["tokenize_requests"] == before + 1


async def test_counting_falls_back_to_the_estimate_without_a_tokenizer() -> None:
    spec = ModelSpec(name="gone", backend="tgi", url=f"http://127.0.0.1:{free_port()}")
    counter = TokenCounter(timeout_s=2.0)
    try:
        count = await counter.count(spec, "x" * 10)
        again = await counter.count(spec, "y" * 10)
    finally:
        await counter.aclose()
    assert not count.exact and count.tokens == estimate("x" * 10) == 3
    assert counter.calls == 1 and not again.exact  # a failed backend is not asked at once again


def test_long_conversation_is_trimmed_to_fit(platform: Platform, http: httpx.Client) -> None:
    sim = platform.sims["fast"]
    messages = _long_conversation()
    job = submit(http, model="tiny", messages=messages, max_tokens=100)
    done = wait_for(http, job["id"])
    assert done["status"] == "succeeded", done
    # 6 (system) + 6 x 14 (turns) + 6 (last) + 3 (cue) = 99 > 48: four turns go.
    assert done["dropped_messages"] == 4
    kept = _job_input(platform, job["id"])["messages"]
    assert kept == [messages[0], *messages[5:]]
    seen = httpx.get(f"{sim.url}/sim/last_request", timeout=5).json()
    assert "Be brief." in seen["inputs"] and "What now?" in seen["inputs"]
    assert _turn(0) not in seen["inputs"] and _turn(5) in seen["inputs"]
    assert done["usage"]["input_tokens"] == seen["input_length"]
    assert seen["input_length"] + TINY_MAX_TOKENS <= TINY_CONTEXT


def test_short_conversation_is_sent_whole_without_counting(
    platform: Platform, http: httpx.Client
) -> None:
    sim = platform.sims["fast"]
    before = sim.state()["tokenize_requests"]
    job = submit(http, model="tiny", messages=[{"role": "user", "content": "Hi there"}])
    done = wait_for(http, job["id"])
    assert done["status"] == "succeeded", done
    assert done["dropped_messages"] == 0
    assert sim.state()["tokenize_requests"] == before


def test_prompt_too_long_is_refused_without_a_job(platform: Platform) -> None:
    sim = platform.sims["fast"]
    generations = sim.state()["total_requests"]
    with platform.client(platform.new_key("context-prompt")) as client:
        prompt = " ".join(f"w{i}" for i in range(60))
        response = client.post("/v1/jobs", json={"model": "tiny", "prompt": prompt})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["type"] == "context_length_exceeded"
        assert "60 tokens (counted)" in error["message"]
        assert "context of 64 tokens" in error["message"]
        assert client.get("/v1/jobs").json()["data"] == []
    assert sim.state()["total_requests"] == generations


def test_conversation_whose_core_cannot_fit_is_refused(platform: Platform) -> None:
    with platform.client(platform.new_key("context-core")) as client:
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "short"},
            {"role": "user", "content": " ".join(f"w{i}" for i in range(50))},
        ]
        response = client.post("/v1/jobs", json={"model": "tiny", "messages": messages})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["type"] == "context_length_exceeded"
        assert "system and last user messages" in error["message"]
        assert client.get("/v1/jobs").json()["data"] == []


def test_openai_route_answers_context_length_exceeded(platform: Platform) -> None:
    with platform.client(platform.new_key("context-openai")) as client:
        content = " ".join(f"w{i}" for i in range(60))
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}]}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert error["type"] == "invalid_request_error"
        assert client.get("/v1/jobs").json()["data"] == []
