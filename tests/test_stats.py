"""`GET /v1/stats`: the figures equal what the jobs themselves report, per grouping and tenant.

Real jobs run on the simulator for two tenants, three keys, several models and users, and
end in every way (succeeded, cached, failed, cancelled, expired). Feedback and judge
evaluations are written with SQL, as is a judge's own job (which must never count); two jobs
are moved two days back so that days group and the daily rollup has a closed day to hold.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from inferq.db import make_sync_engine
from inferq.stats_rollup import RECENT_DAYS, roll_up
from inferq.stats_table import print_stats
from tests.conftest import Platform, submit, wait_for
from workers.stats import Rollup


@functools.cache
def today() -> date:
    """The UTC day of the module's jobs: read when its first test starts, not when the tests
    are collected (minutes before, perhaps on the day before)."""
    return datetime.now(UTC).date()


def stats_range() -> dict[str, str]:
    return {"from": str(today() - timedelta(days=3)), "to": str(today())}


TIMINGS = ("queue_ms", "ttft_ms", "duration_ms", "tokens_per_second")


@dataclass
class Tenant:
    name: str
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # name: (id, secret)
    jobs: list[dict[str, Any]] = field(default_factory=list)  # the jobs' JSON, plus key and day

    def client(self, platform: Platform, key: str) -> httpx.Client:
        return platform.client(self.keys[key][1])


@dataclass
class Ran:
    a: Tenant
    b: Tenant
    marks: dict[str, dict[str, Any]]  # job id: {"ratings": [...], "score": int | None}


def _sql(platform: Platform, statement: str, *params: Any) -> None:
    url = make_url(platform.database_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(statement, params)


def _new_key(platform: Platform, tenant: Tenant, name: str) -> None:
    with platform.client() as http:
        response = http.post("/v1/admin/keys", json={"name": name, "tenant": tenant.name})
        response.raise_for_status()
        tenant.keys[name] = (response.json()["id"], response.json()["secret"])


def _prompt(label: str) -> str:
    return f"stats {label} {uuid.uuid4().hex}"


def _run(platform: Platform, tenant: Tenant, key: str, runs: list[dict[str, Any]]) -> None:
    """Submit every job at once, then wait for each and keep its JSON with its key."""
    with tenant.client(platform, key) as http:
        ids = [submit(http, **body)["id"] for body in runs]
        for job_id in ids:
            job = wait_for(http, job_id, timeout=60)
            tenant.jobs.append({**job, "key": tenant.keys[key][0], "day": today()})


def _run_jobs(platform: Platform, a: Tenant, b: Tenant) -> None:
    repeated = _prompt("repeated")
    _run(platform, a, "a1", [{"prompt": repeated, "max_tokens": 8, "user": "alice"}])
    _run(
        platform,
        a,
        "a1",
        [
            {"prompt": repeated, "max_tokens": 8, "user": "alice"},  # a cache hit
            {"prompt": _prompt("a1"), "max_tokens": 12, "user": "alice"},
            {"prompt": _prompt("a1"), "max_tokens": 16, "user": "alice"},
            {"model": "slow", "prompt": _prompt("a1"), "max_tokens": 6, "user": "bob"},
            {"model": "slow", "prompt": _prompt("a1"), "max_tokens": 10, "user": "bob"},
        ],
    )
    _run(
        platform,
        a,
        "a2",
        [
            {"model": "down", "prompt": _prompt("a2"), "max_tokens": 8},  # fails
            {"model": "parked", "prompt": _prompt("a2"), "deadline_seconds": 1, "user": "carol"},
            {"prompt": _prompt("a2"), "max_tokens": 9},
            {"prompt": _prompt("a2"), "max_tokens": 11},
        ],
    )
    _cancel_one(platform, a)
    _run(
        platform,
        b,
        "b1",
        [
            {"prompt": _prompt("b1"), "max_tokens": 7, "user": "alice"},
            {"prompt": _prompt("b1"), "max_tokens": 13, "user": "alice"},
            {"model": "slow", "prompt": _prompt("b1"), "max_tokens": 5},
        ],
    )


def _cancel_one(platform: Platform, a: Tenant) -> None:
    with a.client(platform, "a1") as http:
        body = {"model": "slow", "prompt": _prompt("cancel"), "max_tokens": 300, "user": "bob"}
        job_id = submit(http, **body)["id"]
        wait_for(http, job_id, statuses={"running"})
        http.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()
        job = wait_for(http, job_id)
        a.jobs.append({**job, "key": a.keys["a1"][0], "day": today()})


def _move_back(platform: Platform, job: dict[str, Any], days: int) -> None:
    """Move a job `days` back: every timestamp at once, so its timings stay what they were."""
    _sql(
        platform,
        "UPDATE jobs SET created_at = created_at - make_interval(days => %s), "
        "started_at = started_at - make_interval(days => %s), "
        "first_token_at = first_token_at - make_interval(days => %s), "
        "finished_at = finished_at - make_interval(days => %s) WHERE id = %s",
        days,
        days,
        days,
        days,
        job["id"],
    )
    job["day"] = today() - timedelta(days=days)


def _judge_job(platform: Platform, judged: dict[str, Any], tenant: Tenant) -> None:
    """A judge's own job, as the judge writes it: it must not count anywhere."""
    _sql(
        platform,
        'INSERT INTO jobs (id, tenant, api_key_id, requested_model, model, "user", status, '
        "priority, input, params, metadata, input_tokens, output_tokens, cost_usd, created_at, "
        "started_at, first_token_at, finished_at, judge_of) "
        "VALUES (gen_random_uuid(), %s, %s, 'sim', 'sim', 'alice', 'succeeded', 'batch', "
        "'{}', '{}', '{}', 5000, 100, 0.5, now(), now(), now(), now(), %s)",
        tenant.name,
        tenant.keys["a1"][0],
        judged["id"],
    )


def _mark(platform: Platform, ran: Ran, job: dict[str, Any], key_id: str, rating: int) -> None:
    _sql(
        platform,
        "INSERT INTO feedback (job_id, api_key_id, rating) VALUES (%s, %s, %s)",
        job["id"],
        key_id,
        rating,
    )
    ran.marks.setdefault(job["id"], {"ratings": [], "score": None})["ratings"].append(rating)


def _score(platform: Platform, ran: Ran, job: dict[str, Any], score: int | None) -> None:
    _sql(
        platform,
        "INSERT INTO evaluations (job_id, judge_model, score, error) VALUES (%s, 'sim', %s, %s)",
        job["id"],
        score,
        None if score is not None else "no score in the reply",
    )
    ran.marks.setdefault(job["id"], {"ratings": [], "score": None})["score"] = score


@pytest.fixture(scope="module")
def ran(platform: Platform) -> Iterator[Ran]:
    suffix = uuid.uuid4().hex[:8]
    a, b = Tenant(f"stats-a-{suffix}"), Tenant(f"stats-b-{suffix}")
    for tenant, names in ((a, ("a1", "a2")), (b, ("b1",))):
        for name in names:
            _new_key(platform, tenant, name)
    _run_jobs(platform, a, b)
    ran = Ran(a, b, {})
    succeeded = [j for j in a.jobs if j["status"] == "succeeded" and not j["cached"]]
    moved = [j for j in a.jobs if j["key"] == a.keys["a2"][0] and j["model"] == "sim"]
    for job in moved:
        _move_back(platform, job, 2)
    _judge_job(platform, succeeded[0], a)
    a1, a2 = a.keys["a1"][0], a.keys["a2"][0]
    _mark(platform, ran, succeeded[0], a1, 1)
    _mark(platform, ran, succeeded[0], a2, -1)
    _mark(platform, ran, succeeded[1], a1, -1)
    _mark(platform, ran, moved[0], a2, 1)
    _mark(platform, ran, b.jobs[0], b.keys["b1"][0], -1)
    _score(platform, ran, succeeded[0], 4)
    _score(platform, ran, succeeded[1], 2)
    _score(platform, ran, succeeded[2], None)  # the judge's reply could not be read
    _score(platform, ran, moved[0], 5)
    _score(platform, ran, b.jobs[0], 1)
    yield ran


# -- what the figures must be, from the jobs' own JSON ---------------------------------------


def percentile_cont(values: list[float], fraction: float) -> float | None:
    """Postgres's percentile_cont: linear interpolation between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * fraction
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _group_value(job: dict[str, Any], name: str) -> Any:
    return {"model": job["model"], "key": job["key"], "user": job["user"], "day": job["day"]}[name]


def expected_rows(jobs: list[dict[str, Any]], marks: dict[str, Any], group_by: list[str]) -> dict:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        groups[tuple(_group_value(job, name) for name in group_by)].append(job)
    return {group: _expected(members, marks) for group, members in groups.items()}


def _expected(jobs: list[dict[str, Any]], marks: dict[str, Any]) -> dict[str, Any]:
    count = len(jobs)
    ratings = [r for job in jobs for r in marks.get(job["id"], {}).get("ratings", [])]
    scores = [marks[job["id"]]["score"] for job in jobs if job["id"] in marks]
    scores = [s for s in scores if s is not None]
    row: dict[str, Any] = {
        "jobs": count,
        **{s: sum(j["status"] == s for j in jobs) for s in ("succeeded", "failed", "cancelled")},
        "expired": sum(j["status"] == "expired" for j in jobs),
        "input_tokens": sum(j["usage"]["input_tokens"] or 0 for j in jobs),
        "output_tokens": sum(j["usage"]["output_tokens"] or 0 for j in jobs),
        "cost_usd": sum(j["usage"]["cost_usd"] or 0 for j in jobs),
        "cache_hits": sum(j["cached"] for j in jobs),
        "feedback": {"up": ratings.count(1), "down": ratings.count(-1)},
        "judge_score_avg": sum(scores) / len(scores) if scores else None,
    }
    row["cache_hit_rate"] = row["cache_hits"] / count
    row["error_rate"] = row["failed"] / count
    for name in TIMINGS:
        values = [j["timings"][name] for j in jobs if j["timings"][name] is not None]
        row[name] = {f"p{round(q * 100)}": percentile_cont(values, q) for q in (0.5, 0.95, 0.99)}
    return row


def _close(actual: float | None, wanted: float | None, tolerance: float) -> bool:
    if actual is None or wanted is None:
        return actual is wanted
    return math.isclose(actual, wanted, rel_tol=1e-3, abs_tol=tolerance)


def assert_matches(actual: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Counts exactly; money, rates and percentiles within rounding (each job's JSON rounds
    its timings to the microsecond, the stats round theirs)."""
    for name in ("jobs", "succeeded", "failed", "cancelled", "expired", "cache_hits"):
        assert actual[name] == wanted[name], name
    for name in ("input_tokens", "output_tokens", "feedback"):
        assert actual[name] == wanted[name], name
    assert _close(actual["cost_usd"], wanted["cost_usd"], 1e-7)
    assert _close(actual["cache_hit_rate"], wanted["cache_hit_rate"], 1e-4)
    assert _close(actual["error_rate"], wanted["error_rate"], 1e-4)
    assert _close(actual["judge_score_avg"], wanted["judge_score_avg"], 1e-3)
    for name in TIMINGS:
        for p in ("p50", "p95", "p99"):
            assert _close(actual[name][p], wanted[name][p], 0.01), (name, p, actual[name])


def _group_of(row: dict[str, Any], group_by: list[str]) -> tuple[Any, ...]:
    values = []
    for name in group_by:
        value = row[name]
        if name == "key":
            value = value["id"]
        elif name == "day":
            value = date.fromisoformat(value)
        values.append(value)
    return tuple(values)


def _stats(http: httpx.Client, **params: str) -> list[dict[str, Any]]:
    response = http.get("/v1/stats", params={**stats_range(), **params})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def assert_stats_equal_jobs(http: httpx.Client, tenant: Tenant, ran: Ran, group_by: str) -> None:
    names = [name for name in group_by.split(",") if name]
    rows = _stats(http, group_by=group_by) if names else _stats(http)
    wanted = expected_rows(tenant.jobs, ran.marks, names)
    assert {_group_of(row, names) for row in rows} == set(wanted)
    others = {"model", "key", "user", "day"} - set(names)
    for row in rows:
        assert not others & set(row)  # only the group fields asked for
        assert_matches(row, wanted[_group_of(row, names)])


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("group_by", ["", "model", "key", "user", "day", "model,day", "key,user"])
def test_figures_equal_the_jobs_for_each_grouping(
    platform: Platform, ran: Ran, group_by: str
) -> None:
    with ran.a.client(platform, "a2") as http:  # any key of the tenant sees all its jobs
        assert_stats_equal_jobs(http, ran.a, ran, group_by)


def test_the_jobs_ran_every_way(ran: Ran) -> None:
    """The fixture's premise: each outcome, a cache hit, two days, feedback both ways."""
    statuses = {job["status"] for job in ran.a.jobs}
    assert statuses == {"succeeded", "failed", "cancelled", "expired"}
    assert any(job["cached"] for job in ran.a.jobs)
    assert {job["day"] for job in ran.a.jobs} == {today(), today() - timedelta(days=2)}


def test_a_tenant_sees_only_its_own_jobs(platform: Platform, ran: Ran) -> None:
    with ran.b.client(platform, "b1") as http:
        assert_stats_equal_jobs(http, ran.b, ran, "key,model")
        assert [row["key"]["name"] for row in _stats(http, group_by="key")] == ["b1"]
    with ran.a.client(platform, "a1") as http:
        names = {row["key"]["name"] for row in _stats(http, group_by="key")}
    assert names == {"a1", "a2"}


def test_a_judges_own_jobs_never_count(platform: Platform, ran: Ran) -> None:
    with ran.a.client(platform, "a1") as http:
        (row,) = _stats(http)
    assert row["jobs"] == len(ran.a.jobs)
    assert row["cost_usd"] < 0.5 and row["input_tokens"] < 5000  # the judge's job has those


def test_rows_are_in_the_order_of_their_group_fields(platform: Platform, ran: Ran) -> None:
    with ran.a.client(platform, "a1") as http:
        rows = _stats(http, group_by="day,model")
    keys = [(row["day"], row["model"]) for row in rows]
    assert keys == sorted(keys)


def test_the_rollup_answers_as_the_jobs_do_and_follows_late_feedback(
    platform: Platform, ran: Ran
) -> None:
    engine = make_sync_engine(platform.database_url, pool_size=1)
    moved = next(job for job in ran.a.jobs if job["day"] != today())
    try:
        with ran.a.client(platform, "a1") as http:
            live = _stats(http, group_by="day,model,user")
            assert roll_up(engine) >= 1  # the day two days back is closed
            assert _stats(http, group_by="day,model,user") == live
            one_day = {"from": str(moved["day"]), "to": str(moved["day"])}
            assert http.get("/v1/stats", params={**one_day, "group_by": "key"}).status_code == 200
            _mark(platform, ran, moved, ran.a.keys["a1"][0], -1)  # after the rollup
            assert_stats_equal_jobs(http, ran.a, ran, "day,model,user")
            assert roll_up(engine) >= 1  # the day changed: rolled up again
            assert_stats_equal_jobs(http, ran.a, ran, "day,model,user")
            assert_stats_equal_jobs(http, ran.a, ran, "day,key")
    finally:
        engine.dispose()


def _closed_job(platform: Platform, tenant: str, day: date) -> str:
    job_id = str(uuid.uuid4())
    _sql(
        platform,
        "INSERT INTO jobs (id, tenant, requested_model, model, status, priority, input, params,"
        " metadata, created_at, started_at, finished_at)"
        " VALUES (%s, %s, 'sim', 'sim', 'succeeded', 'batch', '{}', '{}', '{}', %s, %s, %s)",
        job_id,
        tenant,
        *(datetime.combine(day, datetime.min.time(), UTC) + timedelta(hours=12),) * 3,
    )
    return job_id


def _changes_seen(platform: Platform, tenant: str) -> int | None:
    url = make_url(platform.database_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
        row = conn.execute(
            "SELECT changes_seen FROM stats_days WHERE tenant = %s", (tenant,)
        ).fetchone()
    return None if row is None else int(row[0])


def test_a_day_that_cannot_be_rolled_up_does_not_hold_up_the_others(
    platform: Platform,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    first, second = f"roll-a-{suffix}", f"roll-b-{suffix}"  # rolled up in this order
    day = today() - timedelta(days=2)
    jobs = {tenant: _closed_job(platform, tenant, day) for tenant in (first, second)}
    url = make_url(platform.database_url).set(drivername="postgresql+psycopg")
    # A lock wait over 300 ms fails the statement, as a statement timeout would.
    engine = create_engine(url, connect_args={"options": "-c lock_timeout=300"})
    owner = psycopg.connect(url.set(drivername="postgresql").render_as_string(False))
    try:
        roll_up(engine)
        assert _changes_seen(platform, first) == _changes_seen(platform, second) == 0
        for job_id in jobs.values():  # late feedback: both days are stale
            _sql(platform, "INSERT INTO feedback (job_id, rating) VALUES (%s, 1)", job_id)
        # Another session holds the first day's row: its rollup fails, the next one's not.
        owner.execute("SELECT 1 FROM stats_days WHERE tenant = %s FOR UPDATE", (first,))
        roll_up(engine)
        assert _changes_seen(platform, second) == 1
        assert _changes_seen(platform, first) == 0
    finally:
        owner.close()
        engine.dispose()


def test_beats_first_rollup_reaches_days_that_closed_while_it_was_down(
    platform: Platform,
) -> None:
    tenant = f"roll-back-{uuid.uuid4().hex[:8]}"
    _closed_job(platform, tenant, today() - timedelta(days=20))
    ctx = SimpleNamespace(engine=make_sync_engine(platform.database_url, pool_size=1))
    try:
        rollup = Rollup(ctx)  # type: ignore[arg-type]
        assert roll_up(ctx.engine) >= 0 and _changes_seen(platform, tenant) is None
        rollup()  # the first pass looks back over the longest range
        assert _changes_seen(platform, tenant) == 0
        assert rollup.days == RECENT_DAYS
    finally:
        ctx.engine.dispose()


def test_one_day_grouped_by_user_is_what_each_user_did_that_day(
    platform: Platform, ran: Ran
) -> None:
    """ "What did each user cost that day": a one-day range, grouped by user."""
    day = today() - timedelta(days=2)
    jobs = [job for job in ran.a.jobs if job["day"] == day]
    with ran.a.client(platform, "a1") as http:
        rows = http.get(
            "/v1/stats", params={"from": str(day), "to": str(day), "group_by": "user"}
        ).json()["data"]
    wanted = expected_rows(jobs, ran.marks, ["user"])
    assert {(row["user"],) for row in rows} == set(wanted)
    for row in rows:
        assert_matches(row, wanted[(row["user"],)])


def test_defaults_are_the_last_seven_days_in_one_row(platform: Platform, ran: Ran) -> None:
    with ran.a.client(platform, "a1") as http:
        rows = http.get("/v1/stats").json()["data"]
    assert len(rows) == 1 and rows[0]["jobs"] == len(ran.a.jobs)


def test_no_jobs_is_one_row_of_zeros_ungrouped_and_no_rows_grouped(
    platform: Platform, ran: Ran
) -> None:
    quiet = {"from": "2020-01-01", "to": "2020-01-31"}
    with ran.a.client(platform, "a1") as http:
        (row,) = http.get("/v1/stats", params=quiet).json()["data"]
        grouped = http.get("/v1/stats", params={**quiet, "group_by": "model"}).json()["data"]
    assert row["jobs"] == 0 and row["cost_usd"] == 0 and row["ttft_ms"]["p95"] is None
    assert grouped == []


def test_the_bootstrap_keys_jobs_show_as_bootstrap(platform: Platform) -> None:
    user = f"stats-boot-{uuid.uuid4().hex[:8]}"
    with platform.client() as http:
        wait_for(http, submit(http, prompt=_prompt("boot"), max_tokens=4, user=user)["id"])
        rows = _stats(http, group_by="key,user")
    (mine,) = [row for row in rows if row["user"] == user]
    assert mine["key"] == {"id": None, "name": "bootstrap"} and mine["jobs"] == 1


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"from": "2026-13-01"}, "not a date"),
        ({"to": "2026-02-30"}, "not a date"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-W49-6"}, "not a date"),  # ISO 8601, but not YYYY-MM-DD
        ({"from": "9999-12-30", "to": "9999-12-31"}, "not a date"),
        ({"from": "2026-12-05", "to": "2026-12-01"}, "after"),
        ({"from": "2026-01-01", "to": "2026-12-31"}, "at most 92"),
        ({"group_by": "model,tenant"}, "unknown 'tenant'"),
    ],
)
def test_bad_parameters_are_a_422_that_says_why(
    platform: Platform, ran: Ran, params: dict[str, str], words: str
) -> None:
    with ran.a.client(platform, "a1") as http:
        response = http.get("/v1/stats", params=params)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and words in error["message"]


@pytest.mark.parametrize(
    "params",
    [
        {"to": "0001-01-03"},  # the default week would start before the first day there is
        {"from": "0001-01-01", "to": "0001-01-01"},
        {"from": "9999-12-24", "to": "9999-12-30"},
        {"to": "9999-12-30", "group_by": "model,model,day"},
    ],
)
def test_the_ends_of_the_calendar_are_answered(
    platform: Platform, ran: Ran, params: dict[str, str]
) -> None:
    with ran.a.client(platform, "a1") as http:
        response = http.get("/v1/stats", params=params)
    assert response.status_code == 200, response.text
    assert all(row.get("jobs", 0) == 0 for row in response.json()["data"])


def test_the_cli_table_has_one_column_per_group_field(
    platform: Platform, ran: Ran, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ran.a.keys["a1"][1]
    span = stats_range()
    code = print_stats(platform.api_url, key, span["from"], span["to"], "model,model", False)
    assert code == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split()[:2] == ["model", "jobs"]
    models = {job["model"] for job in ran.a.jobs}
    assert sorted(line.split()[0] for line in lines) == sorted(models)
    assert all(line.split()[1].replace(",", "").isdigit() for line in lines)


def test_stats_need_a_key(platform: Platform) -> None:
    response = httpx.get(f"{platform.api_url}/v1/stats", timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
