"""The judge: reading replies (pure), and scoring sampled jobs end to end.

The end-to-end tests run a deployment of their own (database, API, worker, simulators) whose
models file has a [judge] table with `sample_rate = 1.0`. The simulator's words are no score,
so the judge model runs on a simulator started with `--reply`, answering the JSON the judge's
prompt asks for; judging with the plain simulator gives an unreadable reply, judging with a
backend that is down gives a failed judge's job, and both are recorded.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psycopg
import pytest

from inferq.judge import JUDGE_TENANT, Judged, parse, render, sampled
from inferq.limits import counters_prefix, reservation_key, to_nano
from inferq.metrics import JUDGE_VERDICTS
from inferq.migrate import upgrade
from inferq.registry import ModelsFileError, Registry
from inferq.settings import Settings
from tests.conftest import Platform, _start_sim, submit, wait_for
from tests.servers import (
    Databases,
    create_database,
    drop_database,
    free_port,
    redis_client,
    wait_http,
)
from workers.context import WorkerContext
from workers.judge import _record_verdicts, judge_pass

REPLY = '{"score": 4, "rationale": "Clear and mostly right."}'

# ------------------------------------------------------------------------- the parser


@pytest.mark.parametrize(
    ("reply", "score", "rationale"),
    [
        (REPLY, 4, "Clear and mostly right."),
        ('Sure! ```json\n{"score": "5", "rationale": "Perfect."}\n```', 5, "Perfect."),
        ('{"note": 1} then {"score": 2.0, "rationale": "Vague."}', 2, "Vague."),
        ('{"score": 3}', 3, None),
        ("Score: 2\nThe answer misses the point.", 2, "Score: 2\nThe answer misses the point."),
        ("**Score:** 5 - excellent", 5, "**Score:** 5 - excellent"),
        ("I would give it 3/5.", 3, "I would give it 3/5."),
        ("Rating: 4 out of 5", 4, "Rating: 4 out of 5"),
    ],
)
def test_parse_reads_a_score_and_rationale(reply: str, score: int, rationale: str | None) -> None:
    verdict = parse(reply)
    assert (verdict.score, verdict.rationale, verdict.error) == (score, rationale, None)


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "the of and to in",
        '{"score": 7, "rationale": "off the scale"}',
        '{"score": true}',
        "score: 0",
        "score: 10",
        "score: 4.5",
        "15/50",
    ],
)
def test_parse_refuses_a_reply_without_a_score(reply: str) -> None:
    verdict = parse(reply)
    assert verdict.score is None
    assert verdict.error


def test_parse_bounds_the_rationale() -> None:
    verdict = parse('{"score": 1, "rationale": "%s"}' % ("x" * 5000))
    assert verdict.score == 1
    assert verdict.rationale is not None and len(verdict.rationale) == 2000


def test_render_fills_placeholders_once_and_keeps_other_braces() -> None:
    template = 'Q: {input}\nA: {output}\nModel {model}. Reply {"score": N}'
    text = render(template, "ask {output}", "answer", "small", 10_000)
    assert text == 'Q: ask {output}\nA: answer\nModel small. Reply {"score": N}'


def test_render_shortens_long_texts_to_the_budget() -> None:
    text = render("{input}|{output}", "a" * 10_000, "b" * 10_000, "m", 2000)
    request, answer = text.split("|")
    assert len(request) <= 1000 and len(answer) <= 1000
    assert request.startswith("a") and request.endswith("a") and "[…]" in request


def test_sampling_is_decided_by_the_job_id() -> None:
    ids = [uuid.uuid4() for _ in range(4000)]
    chosen = [i for i in ids if sampled(i, 0.25)]
    assert 800 < len(chosen) < 1200
    assert chosen == [i for i in ids if sampled(i, 0.25)]  # the same answer every time
    assert all(sampled(i, 1.0) for i in ids) and not any(sampled(i, 0.0) for i in ids)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('model = "sim"\nsample_rate = 1.5', "'sample_rate' in [judge]"),
        ('model = "sim"\nsample_rate = 0.1\nrate = 1', "unknown key 'rate' in [judge]"),
        ('model = "nope"\nsample_rate = 0.1', "[judge] model 'nope' is not a configured model"),
        ('model = "sim"\nsample_rate = 0.1\nprompt = "Rate it"', "add {output}"),
        ('model = "sim"\nsample_rate = 0.1\nprompt = "{ouput}"', "unknown placeholder {ouput}"),
    ],
)
def test_a_bad_judge_table_is_refused(table: str, message: str) -> None:
    models = f'[models.sim]\nurl = "http://127.0.0.1:1"\n[judge]\n{table}\n'
    with pytest.raises(ModelsFileError) as refused:
        Registry.from_toml(models)
    assert message in str(refused.value)


def test_the_judge_table_has_a_default_prompt() -> None:
    models = '[models.sim]\nurl = "http://127.0.0.1:1"\n[judge]\nmodel = "sim"\nsample_rate = 0.5'
    judge = Registry.from_toml(models).judge
    assert judge is not None
    assert "{output}" in judge.template and '"score"' in judge.template


def test_no_key_can_be_made_for_the_judges_tenant(platform: Platform) -> None:
    with platform.client() as http:
        response = http.post("/v1/admin/keys", json={"name": "sneaky", "tenant": JUDGE_TENANT})
    assert response.status_code == 422, response.text
    assert "reserved" in response.json()["error"]["message"]


# ------------------------------------------------------------------------- end to end

MODELS = """
[models.sim]
backend = "tgi"
url = "{sim}"
max_tokens = 64
price_input_per_mtok = 0.25
price_output_per_mtok = 1.25

[models.scorer]
backend = "tgi"
url = "{scorer}"
max_tokens = 64
price_input_per_mtok = 1.0
price_output_per_mtok = 2.0

[models.down]
backend = "tgi"
url = "http://127.0.0.1:{closed}"
max_tokens = 16

[judge]
model = "{judge}"
sample_rate = 1.0
max_tokens = 48
"""


@dataclass
class Deployment:
    platform: Platform
    models: dict[str, Path]  # a models file per judge model

    def settings(self, judge: str) -> Settings:
        return Settings(
            environment="test",
            database_url=self.platform.database_url,
            redis_url=self.platform.redis_url,
            models_file=self.models[judge],
        )


@pytest.fixture(scope="module")
def deployment(
    databases: Databases, tmp_path_factory: pytest.TempPathFactory, platform: Platform
) -> Iterator[Deployment]:
    """A database, simulators, API and worker of its own (no beat: each test says how the
    judge runs); the session's Redis."""
    scratch = tmp_path_factory.mktemp("judge")
    database_url, db_name = create_database(databases.admin_url)
    upgrade(database_url)
    env = {k: v for k, v in platform.env.items() if k != "INFERQ_MODELS_FILE"}
    sims = {
        "sim": _start_sim("judge-plain", platform.logs, env, "--ttft-ms", "5", "--itl-ms", "1"),
        "scorer": _start_sim(
            "judge-scorer", platform.logs, env, "--ttft-ms", "5", "--itl-ms", "1", "--reply", REPLY
        ),
    }
    try:
        yield from _deploy(platform, scratch, env, database_url, sims)
    finally:
        for sim in sims.values():
            sim.process.stop()
        drop_database(databases.admin_url, db_name)


def _deploy(
    platform: Platform, scratch: Path, env: dict[str, str], database_url: str, sims: dict[str, Any]
) -> Iterator[Deployment]:
    closed = free_port()
    models = {}
    for judge in ("scorer", "sim", "down"):
        models[judge] = scratch / f"models-{judge}.toml"
        urls = {"sim": sims["sim"].url, "scorer": sims["scorer"].url}
        models[judge].write_text(MODELS.format(**urls, closed=closed, judge=judge))
    port = free_port()
    env = env | {"INFERQ_DATABASE_URL": database_url, "INFERQ_MODELS_FILE": str(models["scorer"])}
    own = Platform(
        f"http://127.0.0.1:{port}", env, database_url, platform.redis_url, platform.logs, sims
    )
    try:
        api = own.spawn("api", "--port", str(port), name="judge-api")
        own.spawn(
            "worker", "--models", "sim,scorer,down", "--name", "judge@test", name="judge-worker"
        )
        wait_http(f"{own.api_url}/readyz", api)
        yield Deployment(own, models)
    finally:
        for process in reversed(own.processes):
            process.stop()


def _evaluation(platform: Platform, job_id: str) -> dict[str, Any] | None:
    with psycopg.connect(platform.database_url) as db:
        row = db.execute(
            "SELECT e.judge_job_id, e.judge_model, e.score, e.rationale, e.error, e.judged_at,"
            " j.tenant, j.judge_of, j.params, j.priority, j.status, j.api_key_id"
            " FROM evaluations e LEFT JOIN jobs j ON j.id = e.judge_job_id WHERE e.job_id = %s",
            (job_id,),
        ).fetchone()
    if row is None:
        return None
    names = "judge_job_id judge_model score rationale error judged_at"
    names += " tenant judge_of params priority status api_key_id"
    return dict(zip(names.split(), row, strict=True))


def _wait_judged(platform: Platform, job_id: str, step: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if step is not None:
            step()
        found = _evaluation(platform, job_id)
        if found is not None and found["judged_at"] is not None:
            return found
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not judged: {_evaluation(platform, job_id)}")


def test_beat_judges_a_sampled_job(deployment: Deployment) -> None:
    platform = deployment.platform
    metrics_port = free_port()
    beat_env = {
        "INFERQ_JUDGE_INTERVAL_SECONDS": "0.3",
        "INFERQ_BEAT_METRICS_PORT": str(metrics_port),
    }
    schedule = str(platform.logs / "judge-beat-schedule")
    beat = platform.spawn("beat", "--schedule", schedule, name="judge-beat", **beat_env)
    try:
        tenant = f"judged-{uuid.uuid4().hex[:6]}"
        with platform.client() as http:
            body = {"name": tenant, "tenant": tenant, "daily_budget_usd": 10}
            created = http.post("/v1/admin/keys", json=body).json()
        key_id = created["id"]
        with platform.client(created["secret"]) as http:
            job = wait_for(http, submit(http, prompt="What is a queue?", max_tokens=16)["id"])
            assert job["status"] == "succeeded"
            found = _wait_judged(platform, job["id"])
            shown = http.get(f"/v1/jobs/{job['id']}").json()
            listed = http.get("/v1/jobs", params={"limit": 100}).json()["data"]
        assert (found["score"], found["rationale"], found["error"]) == (
            4,
            "Clear and mostly right.",
            None,
        )
        assert shown["evaluation"] == {
            "score": 4,
            "rationale": "Clear and mostly right.",
            "judge_model": "scorer",
            "error": None,
        }
        # The judge's job: an ordinary job of the reserved tenant, greedy, at batch priority.
        assert (found["tenant"], str(found["judge_of"])) == (JUDGE_TENANT, job["id"])
        assert found["api_key_id"] is None and found["priority"] == "batch"
        assert found["params"]["temperature"] == 0 and found["params"]["seed"] == 0
        assert found["status"] == "succeeded"
        assert [j["id"] for j in listed] == [job["id"]]
        with platform.client() as http:
            others = http.get("/v1/jobs", params={"limit": 100}).json()["data"]
        assert str(found["judge_job_id"]) not in {j["id"] for j in others}
        # Only the judged job's cost counts in its key's spend; the judge's job reserved nothing.
        day = int(time.time()) // 86400
        redis = redis_client(platform.redis_url)
        spent = int(redis.get(f"{counters_prefix(key_id)}:spent:{day}") or 0)
        assert spent == to_nano(job["usage"]["cost_usd"]) > 0
        assert not redis.exists(reservation_key(str(found["judge_job_id"])))
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert 'inferq_judge_score_count{model="sim"}' in metrics
        assert 'inferq_judge_verdicts_total{model="sim",outcome="scored"}' in metrics
    finally:
        beat.stop()


@pytest.fixture
def judge_ctx(deployment: Deployment, request: pytest.FixtureRequest) -> Iterator[WorkerContext]:
    """beat's judge pass, run here with the [judge] table naming `request.param`."""
    ctx = WorkerContext.create(deployment.settings(request.param), threads=2)
    yield ctx
    ctx.close()


@pytest.mark.parametrize("judge_ctx", ["sim"], indirect=True)
def test_an_unreadable_reply_is_recorded_once(
    deployment: Deployment, judge_ctx: WorkerContext
) -> None:
    platform = deployment.platform
    with platform.client() as http:
        job = wait_for(http, submit(http, prompt="Judge me plainly", max_tokens=8)["id"])
        found = _wait_judged(platform, job["id"], lambda: judge_pass(judge_ctx))
        shown = http.get(f"/v1/jobs/{job['id']}").json()["evaluation"]
    assert found["score"] is None and found["judge_model"] == "sim"
    assert "no score 1-5" in found["error"]
    assert found["rationale"]  # the start of the reply, for whoever looks into it
    assert shown["score"] is None and shown["error"] == found["error"]
    judged_at = found["judged_at"]
    for _ in range(3):
        judge_pass(judge_ctx)
    again = _evaluation(platform, job["id"])
    assert again is not None and again["judged_at"] == judged_at  # not judged again


@pytest.mark.parametrize("judge_ctx", ["down"], indirect=True)
def test_a_failed_judge_job_is_recorded(deployment: Deployment, judge_ctx: WorkerContext) -> None:
    platform = deployment.platform
    with platform.client() as http:
        job = wait_for(http, submit(http, prompt="Judge me when down", max_tokens=8)["id"])
        found = _wait_judged(platform, job["id"], lambda: judge_pass(judge_ctx))
        shown = http.get(f"/v1/jobs/{job['id']}").json()["evaluation"]
    assert found["score"] is None and found["status"] == "failed"
    assert found["error"].startswith("the judge's job ended failed")
    assert shown["error"] == found["error"]


@pytest.mark.parametrize("judge_ctx", ["sim"], indirect=True)
def test_judge_jobs_and_cache_hits_are_not_judged(
    deployment: Deployment, judge_ctx: WorkerContext
) -> None:
    platform = deployment.platform
    with platform.client() as http:
        first = wait_for(http, submit(http, prompt="Same again", max_tokens=8, seed=3)["id"])
        _wait_judged(platform, first["id"], lambda: judge_pass(judge_ctx))
        hit = submit(http, prompt="Same again", max_tokens=8, seed=3)
        assert hit["cached"] is True
        time.sleep(2.5)  # past the pass's settle time
        judge_pass(judge_ctx)
    assert _evaluation(platform, hit["id"]) is None
    with psycopg.connect(platform.database_url) as db:
        judges = db.execute("SELECT id FROM jobs WHERE judge_of IS NOT NULL").fetchall()
        judged_judges = db.execute(
            "SELECT count(*) FROM evaluations WHERE job_id = ANY(%s)", ([r[0] for r in judges],)
        ).fetchone()
    assert judges and judged_judges == (0,)


def _sql(platform: Platform, statement: str, *params: Any) -> None:
    with psycopg.connect(platform.database_url, autocommit=True) as db:
        db.execute(statement, params)


@pytest.mark.parametrize("judge_ctx", ["sim"], indirect=True)
def test_a_job_whose_input_was_redacted_is_judged_on_its_answer(
    deployment: Deployment, judge_ctx: WorkerContext
) -> None:
    """INFERQ_REDACT_INPUTS clears the input as the job ends: the answer is still judged.
    A job whose output retention cleared is not."""
    platform = deployment.platform
    with platform.client() as http:
        redacted = wait_for(http, submit(http, prompt="Secret request", max_tokens=8)["id"])
        cleared = wait_for(http, submit(http, prompt="Old request", max_tokens=8)["id"])
        # What the statement that ends a job submitted with redaction on writes, and what
        # retention writes (both before the pass's settle time is over).
        _sql(
            platform,
            "UPDATE jobs SET input = '{}', redacted_at = now() WHERE id = %s",
            redacted["id"],
        )
        _sql(
            platform,
            "UPDATE jobs SET input = '{}', output = NULL, redacted_at = now() WHERE id = %s",
            cleared["id"],
        )
        found = _wait_judged(platform, redacted["id"], lambda: judge_pass(judge_ctx))
    time.sleep(2.5)  # past the pass's settle time for both jobs
    judge_pass(judge_ctx)
    with psycopg.connect(platform.database_url) as db:
        (judge_input,) = db.execute(
            "SELECT input FROM jobs WHERE id = %s", (found["judge_job_id"],)
        ).fetchone()
    prompt = judge_input["messages"][0]["content"]
    assert "(the request was not kept)" in prompt and "Secret request" not in prompt
    assert _evaluation(platform, cleared["id"]) is None


@pytest.mark.parametrize("judge_ctx", ["scorer"], indirect=True)
def test_a_verdict_another_beat_recorded_first_is_not_counted_again(
    deployment: Deployment, judge_ctx: WorkerContext
) -> None:
    """Two beats read the same unjudged evaluation; the one whose update comes second
    writes nothing, and neither counts the verdict twice."""
    platform = deployment.platform
    with platform.client() as http:
        job = wait_for(http, submit(http, prompt="Judged by two beats", max_tokens=8)["id"])
    rows = [_judged_by(platform, job["id"], output=REPLY)]
    scored = JUDGE_VERDICTS.labels("sim", "scored")
    before = scored._value.get()
    with ThreadPoolExecutor(1) as pool, psycopg.connect(platform.database_url) as first:
        # The first beat's update, not committed yet: the second reads the row unjudged.
        first.execute(
            "UPDATE evaluations SET score = 3, judged_at = now() WHERE job_id = %s", (job["id"],)
        )
        second = pool.submit(_record_verdicts, judge_ctx, rows)
        _wait_blocked(platform)
        first.commit()
        assert second.result(timeout=30) == 0
    assert scored._value.get() == before
    assert _evaluation(platform, job["id"])["score"] == 3  # type: ignore[index]


@pytest.mark.parametrize("judge_ctx", ["scorer"], indirect=True)
def test_a_judges_end_committed_after_the_walk_passed_it_is_still_read(
    deployment: Deployment, judge_ctx: WorkerContext
) -> None:
    """The walk over ended jobs may pass a judge's job whose end committed late; its verdict
    is read from the pending evaluations all the same."""
    platform = deployment.platform
    with platform.client() as http:
        job = wait_for(http, submit(http, prompt="Judged late", max_tokens=8)["id"])
    judge = _judged_by(platform, job["id"], output=REPLY)
    _sql(platform, "UPDATE jobs SET finished_at = now() - interval '1 day' WHERE id = %s", judge.id)
    judge_pass(judge_ctx)
    found = _evaluation(platform, job["id"])
    assert found is not None and found["score"] is not None, found


def _judged_by(platform: Platform, job_id: str, **judge: Any) -> SimpleNamespace:
    """A judge's job of `job_id` as it ended (`judge`: its columns), and its evaluation."""
    judge_id = uuid.uuid4()
    columns = {"status": "succeeded", "output": None, "error_type": None, "error_message": None}
    columns |= judge
    _sql(
        platform,
        "INSERT INTO jobs (id, tenant, requested_model, model, status, priority, input, params,"
        " metadata, output, error_type, error_message, created_at, started_at, finished_at,"
        " judge_of) VALUES (%s, %s, 'scorer', 'scorer', %s, 'batch', '{}', '{}', '{}', %s, %s,"
        " %s, now(), now(), now(), %s)",
        judge_id,
        JUDGE_TENANT,
        columns["status"],
        columns["output"],
        columns["error_type"],
        columns["error_message"],
        job_id,
    )
    _sql(
        platform,
        "INSERT INTO evaluations (job_id, judge_job_id, judge_model) VALUES (%s, %s, 'scorer')",
        job_id,
        judge_id,
    )
    return SimpleNamespace(id=judge_id, judge_of=uuid.UUID(job_id))


@pytest.mark.parametrize("judge_ctx", ["scorer"], indirect=True)
def test_a_judges_failure_shows_the_tenant_no_backend_address(
    deployment: Deployment, judge_ctx: WorkerContext
) -> None:
    """Where the backends are is not the tenant's business, as in a job's own error."""
    platform = deployment.platform
    with platform.client() as http:
        job = wait_for(http, submit(http, prompt="Judged by a chatty backend", max_tokens=8)["id"])
        message = "http://10.1.2.3:8080/generate answered 400 (from 10.1.2.3:8080)"
        row = _judged_by(
            platform, job["id"], status="failed", error_type="backend", error_message=message
        )
        assert _record_verdicts(judge_ctx, [row]) == 1
        shown = http.get(f"/v1/jobs/{job['id']}").json()["evaluation"]
    assert shown["error"].startswith("the judge's job ended failed: backend: ")
    assert "10.1.2.3" not in shown["error"] and "http://" not in shown["error"]


def _wait_blocked(platform: Platform) -> None:
    """Until a session of the database waits for a row lock."""
    deadline = time.monotonic() + 30
    with psycopg.connect(platform.database_url, autocommit=True) as db:
        while time.monotonic() < deadline:
            waiting = db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            ).fetchone()
            if waiting and waiting[0]:
                return
            time.sleep(0.05)
    raise AssertionError("no session waited for the row lock")


def test_a_judged_job_holds_the_judged_texts(deployment: Deployment) -> None:
    """The judge's prompt (its job's input) shows the request and the answer."""
    from inferq.judge import judge_job

    registry = Registry.load(deployment.models["scorer"])
    assert registry.judge is not None
    spec = registry.get("scorer")
    assert spec is not None
    judged = Judged(uuid.uuid4(), "sim", {"prompt": "What is 2+2?"}, "four")
    row = judge_job(judged, registry.judge, spec, redact=False)
    content = row["input"]["messages"][0]["content"]
    assert "What is 2+2?" in content and "four" in content
    assert row["params"]["max_tokens"] == 48 and row["params"]["cache"] is False
    assert judge_job(judged, registry.judge, spec, redact=True)["params"]["redact_input"]
