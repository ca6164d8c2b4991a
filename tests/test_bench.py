"""`inferq bench --smoke`: the benchmark runs end to end and reports every phase."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import redis

from tests.conftest import BOOTSTRAP_KEY, Platform
from tests.servers import start_sim

PHASES = ("stream", "submit", "fanout", "scale", "relay")


def _bench_env() -> dict[str, str]:
    """The test servers when given (the bench makes its own database there), else embedded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_BENCH_")}
    for name in ("DATABASE_URL", "REDIS_URL"):
        given = os.environ.get(f"INFERQ_TEST_{name}")
        if given:
            env[f"INFERQ_BENCH_{name}"] = given
    return env


def _run_smoke(out: Path) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "inferq", "bench", "--smoke", "--out", str(out)],
        env=_bench_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads((out / "bench.json").read_text())


def _assert_stream(stream: dict[str, Any]) -> None:
    assert [level["concurrency"] for level in stream["levels"]] == [1, 4]
    for level in stream["levels"]:
        for path in ("direct", "platform"):
            figures = level[path]
            assert figures["errors"] == {}, (path, figures["errors"])
            assert figures["ttft_ms"]["n"] == figures["requests"] > 0
            assert 0 < figures["ttft_ms"]["p50"] <= figures["ttft_ms"]["p99"]
            assert figures["itl_ms"]["p50"] > 0
            assert figures["e2e_ms"]["p50"] >= figures["ttft_ms"]["p50"]
            assert figures["tokens_per_s"] > 0
        assert level["overhead"]["tokens_per_s_ratio"] > 0


LIMIT_ROUNDS = {"no limits", "limits"}  # known keys without, then with, limits never reached


def _assert_submit(submit: dict[str, Any]) -> None:
    assert {level["api_processes"] for level in submit["levels"]} == {1, 2}
    for level in submit["levels"]:
        assert level["accepted"] == level["jobs"] > 0
        assert level["jobs_per_s"] > 0
    mixed = [level for level in submit["levels"] if level["keys"] not in LIMIT_ROUNDS]
    assert mixed and {level["keys"] for level in submit["levels"]} >= LIMIT_ROUNDS
    for level in mixed:
        # API keys made through the admin API, new ones first used in the level, beside the
        # bootstrap key: each kind accepted, each reported on its own.
        assert level["new_keys"] > 0
        for use in ("bootstrap", "known key", "new key, first submit"):
            figures = level["by_key"][use]
            assert figures["accepted"] == figures["requests"] > 0, (use, figures)
        assert level["jobs_per_s"] > 0
        assert 0 < level["latency_ms"]["p50"] <= level["latency_ms"]["p99"]


def _assert_fanout(fanout: dict[str, Any]) -> None:
    assert fanout["connections_held"] == fanout["target_clients"] > 0
    assert fanout["api_rss_peak_mib"] > 0
    assert fanout["delivery_lag_ms"]["n"] > 0
    assert fanout["delivery_lag_ms"]["p50"] is not None


def _assert_scale(scale: dict[str, Any]) -> None:
    assert scale["levels"][0]["workers"] == 1
    for level in scale["levels"]:
        assert level["succeeded"] == level["jobs"] > 0
        assert level["jobs_per_s"] > 0
        assert 1 <= level["workers_used"] <= level["workers"]
        assert level["efficiency"] > 0
    assert scale["levels"][0]["efficiency"] == 1.0


def _assert_relay(relay: dict[str, Any]) -> None:
    assert relay["worker_processes"] == 2  # the smoke run's worker: `--processes 2`
    assert [level["clients"] for level in relay["levels"]] == [4, 8]
    for level in relay["levels"]:
        assert level["platform"]["errors"] == {} and level["direct"]["errors"] == {}
        assert level["platform"]["output_tokens"] > 0 and level["worker_cpu_s"] > 0
        assert level["tokens_per_worker_core_s"] > 0 and level["api_cpu_us_per_token"] > 0
        assert level["bare"]["tokens"] > 0 and level["bare"]["errors"] == 0
        assert level["bare"]["cpu_us_per_token"] > 0
    for burst in (relay["first_burst"], relay["warm_burst"]):
        assert burst["errors"] == 0 and burst["ttft_ms"]["n"] == burst["streams"] > 0
    assert relay["tokens_per_worker_core_s"] > 0 and relay["bare_tokens_per_core_s"] > 0


def test_bench_smoke_reports_every_phase(tmp_path: Path) -> None:
    result = _run_smoke(tmp_path)
    assert all(result[phase] is not None for phase in PHASES)
    _assert_stream(result["stream"])
    _assert_submit(result["submit"])
    _assert_fanout(result["fanout"])
    _assert_scale(result["scale"])
    _assert_relay(result["relay"])
    assert set(result["cpu"]) == set(PHASES)
    assert set(result["speed_probe_ms"]) == {*PHASES, "end"}
    assert all(ms > 0 for ms in result["speed_probe_ms"].values())
    assert all(usage["cores_stolen"] >= 0 for usage in result["cpu"].values())
    assert result["environment"]["cpu_count"] >= 1
    assert result["config"]["stream"]["sim"]["itl_ms"] > 0
    assert (tmp_path / "stream-latency.png").stat().st_size > 0


def test_the_fan_out_clients_sse_parser_reads_what_the_api_writes() -> None:
    from api.events.router import PING
    from api.events.wire import encode
    from bench.wire import parse_frame
    from inferq.events import Event
    from inferq.protocol import TokenData

    token = dataclasses.replace(Event.of(TokenData(text="a\nb")), id="1700000000000-3")
    blocks = (encode(token) + PING).replace(b"\r\n", b"\n").split(b"\n\n")
    frame = parse_frame(blocks[0], received=1.0)
    assert frame is not None
    assert (frame.event, frame.id, json.loads(frame.data)) == (
        "token",
        "1700000000000-3",
        {"text": "a\nb"},
    )
    assert parse_frame(blocks[1], received=1.0) is None  # the keep-alive comment


def test_a_kept_alive_submit_connection_is_replaced_once_idle(platform: Platform) -> None:
    """uvicorn drops a connection idle for 5 s; the bench's client must not send on one."""
    import uvloop

    from bench.wire import KeepAlive

    body = json.dumps({"model": "sim", "prompt": "hello", "max_tokens": 2}).encode()

    async def two_submits(max_idle_s: float) -> tuple[list[int], bool]:
        http = KeepAlive(platform.api_url, {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}, max_idle_s)
        try:
            first_status, _ = await http.post_json("/v1/jobs", body)
            first = http._protocol
            await asyncio.sleep(0.05)
            second_status, _ = await http.post_json("/v1/jobs", body)
            return [first_status, second_status], http._protocol is first
        finally:
            http.close()

    assert uvloop.run(two_submits(max_idle_s=30.0)) == ([202, 202], True)
    assert uvloop.run(two_submits(max_idle_s=0.01)) == ([202, 202], False)


def _bench_lines(module: str, *args: str) -> list[dict[str, Any]]:
    """`python -m module args`: the JSON lines it prints, one a run."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.strip().splitlines()]


def test_the_job_path_runs_every_job_once_and_reports_its_cpu(platform: Platform) -> None:
    """bench/job_path.py: its jobs all succeed through the worker's own path, counted once."""
    sim_url, sim = start_sim(platform.logs, itl_ms="0", ttft_ms="0")
    try:
        servers = ["--database-url", platform.database_url, "--redis-url", platform.redis_url]
        sizes = ["--jobs", "40", "--threads", "4", "--repeat", "1"]
        figures = _bench_lines("bench.job_path", sim_url, *servers, *sizes)[-1]
    finally:
        sim.stop()
    assert figures["jobs"] == figures["succeeded"] == 40
    assert figures["cpu_s"] > 0 and figures["cpu_ms_per_job"] > 0


def test_the_consumer_bench_runs_every_task_and_reports_its_cpu(platform: Platform) -> None:
    """bench/consumer.py: a Celery worker set up as the platform's takes and acknowledges
    every message (the run ends only when none is left queued or unacknowledged)."""
    sizes = ["--tasks", "100", "--repeat", "1", "--concurrency", "8"]
    figures = _bench_lines("bench.consumer", "--redis-url", platform.redis_url, *sizes)[-1]
    assert figures["tasks"] == 100
    assert figures["cpu_ms_per_task"] > 0
    # The two commands that record the message, at least (a BRPOP and its script take
    # several messages at a time; other processes share the server, so no upper bound)
    assert figures["redis_commands_per_task"] >= 2


def test_the_submit_insert_bench_times_lone_submits_on_a_fresh_database(
    platform: Platform,
) -> None:
    """bench/submit_insert.py: lone submits through the API's batcher and engine, timed on a
    database of its own, dropped afterwards."""
    before = _bench_databases(platform.database_url)
    sizes = ["--submits", "20", "--repeat", "2"]
    rows = _bench_lines("bench.submit_insert", "--database-url", platform.database_url, *sizes)
    assert [row["submits"] for row in rows] == [20, 20]
    assert all(0 < row["p50_ms"] <= row["p95_ms"] and row["cpu_us_per_submit"] > 0 for row in rows)
    assert _bench_databases(platform.database_url) == before


def test_the_api_job_bench_streams_every_job_with_a_users_key(platform: Platform) -> None:
    """bench/api_job.py: every job submitted and read to its end through the API (a key made
    through the admin API), the API's CPU per job reported; its database dropped after."""
    before = _bench_databases(platform.database_url)
    servers = ["--database-url", platform.database_url, "--redis-url", platform.redis_url]
    sizes = ["--clients", "4", "--jobs", "24", "--tokens", "8", "--repeat", "2"]
    rows = _bench_lines("bench.api_job", *servers, *sizes)
    assert [row["jobs"] for row in rows] == [24, 24]
    assert all(row["api_cpu_ms_per_job"] > 0 and row["token_events_per_job"] >= 1 for row in rows)
    assert _bench_databases(platform.database_url) == before


def test_the_burst_bench_times_each_stage_of_every_job(platform: Platform) -> None:
    """bench/burst.py: a burst's jobs all streamed to `done`, each stage's spread reported
    (submit, row, queue, claim to first token), in order, none negative."""
    servers = ["--database-url", platform.database_url, "--redis-url", platform.redis_url]
    sizes = ["--jobs", "6", "--tokens", "4", "--rounds", "1", "--itl-ms", "5"]
    (row,) = _bench_lines("bench.burst", *servers, *sizes)
    stages = row["ms_p50_p90_max"]
    assert list(stages) == ["submit", "to_row", "queued", "claim_to_first_token", "ttft", "e2e"]
    assert all(0 <= p50 <= p90 <= top for p50, p90, top in stages.values())
    assert stages["ttft"][2] <= stages["e2e"][2]


def test_the_waiting_bench_holds_every_reader_of_a_queued_job(platform: Platform) -> None:
    """bench/waiting.py: every reader waits on its queued job through the measured span, the
    API's CPU meanwhile reported; its database dropped after."""
    before = _bench_databases(platform.database_url)
    servers = ["--database-url", platform.database_url, "--redis-url", platform.redis_url]
    sizes = ["--readers", "8", "--hold-s", "1", "--rounds", "1"]
    (row,) = _bench_lines("bench.waiting", *servers, *sizes)
    assert row["readers"] == row["still_waiting"] == 8
    assert row["api_cpu_s"] >= 0 and row["hold_s"] >= 1
    assert _bench_databases(platform.database_url) == before


def _bench_databases(database_url: str) -> set[str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'inferq_bench_%'")
        return {row[0] for row in rows}


def test_the_redis_write_bench_writes_both_ways_and_cleans_up(platform: Platform) -> None:
    """bench/redis_write.py: a stream's write through redis-py and through the loop's lean
    connection, alone and in a pipeline, a stream's replay and pub/sub messages read both
    ways; its keys and its channel's subscriptions are gone afterwards."""
    sizes = ["--streams", "8", "--writes", "40", "--repeat", "1"]
    rows = _bench_lines("bench.redis_write", "--redis-url", platform.redis_url, *sizes)
    assert [row["shape"] for row in rows] == [
        "alone",
        "8 in a pipeline",
        "replay of 4 events",
        "pub/sub, 16 messages a publish",
    ]
    *writes, messages = rows
    for row in writes:
        assert row["redis_py_cpu_us_per_write"] > 0 < row["lean_cpu_us_per_write"]
    assert messages["redis_py_cpu_us_per_message"] > 0 < messages["lean_cpu_us_per_message"]
    client = redis.Redis.from_url(platform.redis_url)
    assert client.keys("inferq:job:bench-redis-write-*") == []
    assert client.pubsub_channels("bench-redis-write-*") == []
    client.close()
