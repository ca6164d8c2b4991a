"""`auto` routing by the models file's [routing] table, the end user, and top_p 1 on TGI.

The platform's models file routes inputs shorter than 50 estimated tokens (200 characters) to
`sim`, then inputs that mention "prove" to `slow`, else `sim` (see tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.conftest import BOOTSTRAP_KEY, Platform, submit, wait_for

JOB_HEADER = "x-inferq-job-id"
LONG = "Tell me how a queue of inference jobs is kept fair between tenants. " * 5  # > 200 chars
SHORT_PROOF = "Please prove it."


@pytest.fixture
def client(platform: Platform) -> Iterator[OpenAI]:
    with OpenAI(
        base_url=f"{platform.api_url}/v1", api_key=BOOTSTRAP_KEY, max_retries=0, timeout=60
    ) as sync_client:
        yield sync_client


def routed_to(http: httpx.Client, **body: object) -> dict[str, object]:
    job = submit(http, model="auto", max_tokens=4, **body)
    assert job["requested_model"] == "auto"
    return wait_for(http, str(job["id"]))


def routes_counted(http: httpx.Client, target: str) -> float:
    text = http.get("/metrics").text
    line = f'inferq_routes_total{{target="{target}"}}'
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))


def test_jobs_are_routed_by_length_then_keyword_then_default(http: httpx.Client) -> None:
    before = routes_counted(http, "slow")
    short = routed_to(http, prompt=SHORT_PROOF)  # the length rule comes first
    proof = routed_to(http, prompt=LONG + "Now prove that it works.")
    plain = routed_to(http, messages=[{"role": "user", "content": LONG}])
    assert [short["model"], proof["model"], plain["model"]] == ["sim", "slow", "sim"]
    assert all(job["status"] == "succeeded" for job in (short, proof, plain))
    assert all(job["requested_model"] == "auto" for job in (short, proof, plain))
    assert routes_counted(http, "slow") == before + 1


def test_keywords_match_whatever_their_case(http: httpx.Client) -> None:
    job = routed_to(http, messages=[{"role": "user", "content": LONG + " PROVE it"}])
    assert job["model"] == "slow"


def test_the_openai_routes_accept_auto(http: httpx.Client, client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": LONG + " prove it"}], max_tokens=4
    )
    completion = raw.parse()
    assert completion.model == "slow" and completion.choices[0].message.content
    job = http.get(f"/v1/jobs/{raw.headers[JOB_HEADER]}").json()
    assert (job["requested_model"], job["model"]) == ("auto", "slow")
    text = client.completions.create(model="auto", prompt="Hi", max_tokens=4)
    assert text.model == "sim"


def test_models_lists_auto(client: OpenAI) -> None:
    assert "auto" in [m.id for m in client.models.list()]
    assert client.models.retrieve("auto").id == "auto"


def test_the_end_user_is_kept_on_the_job(http: httpx.Client, client: OpenAI) -> None:
    job = submit(http, prompt="Hi", max_tokens=2, user="alice@example.com")
    assert http.get(f"/v1/jobs/{job['id']}").json()["user"] == "alice@example.com"
    raw = client.chat.completions.with_raw_response.create(
        model="sim", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, user="bob"
    )
    assert http.get(f"/v1/jobs/{raw.headers[JOB_HEADER]}").json()["user"] == "bob"
    assert submit(http, prompt="Hi", max_tokens=2)["user"] is None


def test_top_p_one_is_accepted_on_a_tgi_model(http: httpx.Client, client: OpenAI) -> None:
    job = wait_for(http, submit(http, prompt="Hi", max_tokens=4, top_p=1)["id"])
    assert job["status"] == "succeeded", job["error"]
    chat = wait_for(
        http,
        submit(http, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, top_p=1.0)["id"],
    )
    assert chat["status"] == "succeeded", chat["error"]
    completion = client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, top_p=1
    )
    assert completion.choices[0].message.content


def test_a_typo_in_the_models_file_stops_the_api_in_one_line(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[models.small]\nurl = "http://127.0.0.1:9"\nmax_token = 64\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    for command in (["api", "--port", "9"], ["worker"]):
        result = subprocess.run(
            [sys.executable, "-m", "inferq", *command],
            cwd=tmp_path,
            env={**env, "INFERQ_MODELS_FILE": str(models)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0
        assert result.stderr.strip().splitlines() == [
            "Error: models file: unknown key 'max_token' in [models.small]"
        ]
