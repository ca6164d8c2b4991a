"""The OpenAI-compatible routes through the official `openai` client, on the real platform."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from api.openai.streaming import Diverged, Relay
from inferq.events import stream_key
from inferq.registry import Registry
from tests.conftest import BOOTSTRAP_KEY, Platform, wait_for
from tests.servers import redis_client

JOB_HEADER = "x-inferq-job-id"
HELLO = [{"role": "user", "content": "Tell me about queues"}]


@pytest.fixture
def client(platform: Platform) -> Iterator[OpenAI]:
    # No retries: a retried request would be a second job and hide the first answer.
    with OpenAI(
        base_url=f"{platform.api_url}/v1", api_key=BOOTSTRAP_KEY, max_retries=0, timeout=60
    ) as sync_client:
        yield sync_client


@pytest.fixture
async def aclient(platform: Platform) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=f"{platform.api_url}/v1", api_key=BOOTSTRAP_KEY, max_retries=0, timeout=60
    ) as async_client:
        yield async_client


def _job(http: httpx.Client, job_id: str) -> dict[str, Any]:
    return wait_for(http, job_id)


def test_chat_completion_is_a_job_holding_the_same_text_and_usage(
    client: OpenAI, http: httpx.Client
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="sim", messages=HELLO, max_tokens=12, seed=3, metadata={"team": "docs"}
    )
    job_id = raw.headers[JOB_HEADER]
    completion = raw.parse()
    job = _job(http, job_id)
    assert job["status"] == "succeeded"
    assert completion.id == f"chatcmpl-{job_id}"
    assert completion.object == "chat.completion"
    assert completion.model == "sim"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.message.content == job["output"]
    assert choice.finish_reason in {"stop", "length"}
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == job["usage"]["input_tokens"] > 0
    assert completion.usage.completion_tokens == job["usage"]["output_tokens"] > 0
    assert completion.usage.total_tokens == sum(
        job["usage"][k] for k in ("input_tokens", "output_tokens")
    )
    assert job["metadata"] == {"team": "docs"}


def test_text_completion_returns_the_simulators_text(
    platform: Platform, client: OpenAI, http: httpx.Client
) -> None:
    expected = platform.sims["fast"].generate("Tell me about queues", 20, seed=7)
    raw = client.completions.with_raw_response.create(
        model="sim", prompt="Tell me about queues", max_tokens=20, seed=7
    )
    completion = raw.parse()
    choice = completion.choices[0]
    assert completion.object == "text_completion"
    assert choice.text == expected["generated_text"]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == expected["details"]["generated_tokens"]
    reason = expected["details"]["finish_reason"]
    assert choice.finish_reason == ("length" if reason == "length" else "stop")
    assert _job(http, raw.headers[JOB_HEADER])["output"] == choice.text


def test_streamed_chat_equals_the_stored_job_and_ends_with_usage(
    client: OpenAI, http: httpx.Client
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="sim",
        messages=HELLO,
        max_tokens=24,
        seed=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(raw.parse())
    job = _job(http, raw.headers[JOB_HEADER])
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert text == job["output"]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] in {"stop", "length"}
    assert all(r is None for r in reasons[:-1])
    *pieces, last = chunks
    assert all(c.usage is None for c in pieces)
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == job["usage"]["input_tokens"]
    assert last.usage.completion_tokens == job["usage"]["output_tokens"]
    assert {c.id for c in chunks} == {f"chatcmpl-{job['id']}"}


async def test_async_streamed_completion_without_include_usage(
    platform: Platform, aclient: AsyncOpenAI
) -> None:
    expected = platform.sims["fast"].generate("async stream", 10, seed=1)
    stream = await aclient.completions.create(
        model="sim", prompt="async stream", max_tokens=10, seed=1, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].text for c in chunks) == expected["generated_text"]
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}


async def test_same_seed_gives_the_same_text_sync_or_async(
    client: OpenAI, aclient: AsyncOpenAI
) -> None:
    params: dict[str, Any] = {"model": "sim", "messages": HELLO, "max_tokens": 16}
    first = await aclient.chat.completions.create(**params, seed=21)
    again = client.chat.completions.create(**params, seed=21)
    other = client.chat.completions.create(**params, seed=22)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content


def test_stop_and_max_tokens_are_honoured(platform: Platform, client: OpenAI) -> None:
    params: dict[str, Any] = {"model": "sim", "prompt": "stop here", "seed": 5}
    full = client.completions.create(**params, max_tokens=30).choices[0].text
    stop = " " + full.split()[3]
    stopped = client.completions.create(**params, max_tokens=30, stop=stop).choices[0]
    # The simulator, like TGI, keeps the stop sequence in the text.
    assert stopped.text == full[: full.index(stop) + len(stop)]
    assert stopped.finish_reason == "stop"
    # A seed for which the simulator's answer runs into the limit.
    seed = next(
        s
        for s in range(50)
        if platform.sims["fast"].generate("stop here", 3, s)["details"]["finish_reason"] == "length"
    )
    short = client.completions.create(model="sim", prompt="stop here", seed=seed, max_tokens=3)
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None
    assert short.usage.completion_tokens == 3


UNSUPPORTED = [
    pytest.param({"n": 2}, "n", id="n"),
    pytest.param(
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        "tools",
        id="tools",
    ),
    pytest.param({"logprobs": True}, "logprobs", id="logprobs"),
    pytest.param({"response_format": {"type": "json_object"}}, "response_format", id="json"),
    pytest.param({"presence_penalty": 0.5}, "presence_penalty", id="presence-penalty"),
    pytest.param({"extra_body": {"top_k": 5}}, "top_k", id="unknown-parameter"),
    pytest.param({"stream_options": {"include_usage": True}}, "stream_options", id="no-stream"),
    pytest.param(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content",
        id="image",
    ),
    pytest.param({"temperature": 5}, "temperature", id="validation"),
    pytest.param({"messages": []}, "messages", id="no-messages"),
]


@pytest.mark.parametrize(("params", "param"), UNSUPPORTED)
def test_unsupported_or_invalid_parameters_are_a_clear_400(
    client: OpenAI, params: dict[str, Any], param: str
) -> None:
    request: dict[str, Any] = {"model": "sim", "messages": HELLO, "max_tokens": 4, **params}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**request)
    error = raised.value.body
    assert isinstance(error, dict)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["message"] or error["code"] == "invalid_value"


def test_neutral_values_of_unsupported_parameters_are_accepted(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="sim",
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            *HELLO,
        ],
        max_tokens=4,
        n=1,
        presence_penalty=0,
        frequency_penalty=0.0,
        logprobs=False,
        response_format={"type": "text"},
        user="someone",
    )
    assert completion.choices[0].message.content


def test_errors_have_openais_shape(platform: Platform) -> None:
    headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}", "Content-Type": "application/json"}
    response = httpx.post(
        f"{platform.api_url}/v1/chat/completions", content=b"{not json", headers=headers
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_model_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "model_not_found"
    assert raised.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")


def test_bad_key_is_an_authentication_error(platform: Platform) -> None:
    with OpenAI(base_url=f"{platform.api_url}/v1", api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError) as raised:
            stranger.chat.completions.create(model="sim", messages=HELLO)
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "invalid_api_key"


def test_models_lists_the_configured_models(platform: Platform, client: OpenAI) -> None:
    configured = Registry.load(Path(platform.env["INFERQ_MODELS_FILE"])).names()
    assert [m.id for m in client.models.list()] == [*configured, "auto"]
    assert client.models.retrieve("sim").id == "sim"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_idempotency_key_answers_with_the_same_job(client: OpenAI) -> None:
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    params: dict[str, Any] = {"model": "sim", "messages": HELLO, "max_tokens": 8}
    first = client.chat.completions.with_raw_response.create(**params, extra_headers=headers)
    again = client.chat.completions.with_raw_response.create(**params, extra_headers=headers)
    assert first.headers[JOB_HEADER] == again.headers[JOB_HEADER]
    assert first.parse().choices[0].message.content == again.parse().choices[0].message.content


def test_streaming_client_that_disconnects_cancels_its_job(
    client: OpenAI, http: httpx.Client
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="slow", messages=HELLO, max_tokens=300, stream=True
    )
    stream = raw.parse()
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    stream.close()
    job = wait_for(http, raw.headers[JOB_HEADER], timeout=15)
    assert job["status"] == "cancelled"
    assert 3 <= job["usage"]["output_tokens"] < 300


def test_non_streaming_client_that_gives_up_cancels_its_job(
    platform: Platform, http: httpx.Client
) -> None:
    tag = str(uuid.uuid4())
    body = {"model": "slow", "prompt": "a long answer", "max_tokens": 300, "metadata": {"tag": tag}}
    headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{platform.api_url}/v1/completions", json=body, headers=headers, timeout=1.5)
    jobs = http.get("/v1/jobs", params={"limit": 50}).json()["data"]
    job_id = next(j["id"] for j in jobs if j["metadata"] == {"tag": tag})
    job = wait_for(http, job_id, timeout=15)
    assert job["status"] == "cancelled"
    assert job["usage"]["output_tokens"] < 300


def test_failed_job_is_an_openai_error_naming_the_job(client: OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="down", messages=HELLO, max_tokens=4)
    assert raised.value.status_code == 502
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["type"] == "server_error"
    job = http.get(f"/v1/jobs/{raised.value.response.headers[JOB_HEADER]}").json()
    assert job["status"] == "failed"
    assert raised.value.body["code"] == job["error"]["type"]

    stream = client.chat.completions.create(model="down", messages=HELLO, max_tokens=4, stream=True)
    with pytest.raises(openai.APIError) as in_stream:
        for _ in stream:
            pass
    assert in_stream.value.body is not None


def test_stream_goes_on_through_a_restarted_generation(
    platform: Platform, client: OpenAI, http: httpx.Client
) -> None:
    faulty = platform.sims["faulty"]
    expected = faulty.generate("restart me", 30, seed=11)["generated_text"]
    faulty.fault("generation", count=1)  # strikes after three tokens; the worker retries
    try:
        raw = client.completions.with_raw_response.create(
            model="faulty", prompt="restart me", max_tokens=30, seed=11, stream=True
        )
        text = "".join(chunk.choices[0].text for chunk in raw.parse() if chunk.choices)
    finally:
        faulty.clear_faults()
    job_id = raw.headers[JOB_HEADER]
    job = wait_for(http, job_id)
    assert text == job["output"] == expected
    kinds = [
        fields["e"] for _, fields in redis_client(platform.redis_url).xrange(stream_key(job_id))
    ]
    assert "reset" in kinds
    assert kinds.index("token") < kinds.index("reset"), "tokens were streamed before the restart"


def test_relay_follows_a_restart_that_repeats_the_text() -> None:
    relay = Relay()
    assert relay.token("Hello") == "Hello"
    assert relay.token(" wor") == " wor"
    relay.reset()
    assert relay.token("Hel") == ""
    assert relay.token("lo w") == ""
    assert relay.token("orld") == "ld"
    assert relay.token("!") == "!"
    relay.settle()
    assert relay.sent == "Hello world!"


def test_relay_refuses_a_restart_with_different_text() -> None:
    relay = Relay()
    relay.token("Hello")
    relay.reset()
    with pytest.raises(Diverged):
        relay.token("Help")
    shorter = Relay()
    shorter.token("Hello")
    shorter.reset()
    shorter.token("Hell")
    with pytest.raises(Diverged):
        shorter.settle()
    quiet = Relay()
    quiet.reset()  # nothing was sent yet: the restart is invisible
    assert quiet.token("Hi") == "Hi"
