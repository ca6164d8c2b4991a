"""The command line as a newcomer meets it: one clear line where something is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import Platform, submit, wait_for
from tests.servers import Databases, drop_database, free_port


def inferq(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    return subprocess.run(
        [sys.executable, "-m", "inferq", *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_creates_a_missing_database(databases: Databases, tmp_path: Path) -> None:
    name = f"inferq_cli_{uuid.uuid4().hex[:8]}"
    url = make_url(databases.admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        first = inferq("migrate", cwd=tmp_path, INFERQ_DATABASE_URL=url)
        assert first.returncode == 0, first.stderr
        assert "created database" in first.stdout and name in first.stdout
        again = inferq("migrate", cwd=tmp_path, INFERQ_DATABASE_URL=url)
        assert again.returncode == 0 and "created" not in again.stdout
    finally:
        drop_database(databases.admin_url, name)


def test_an_unreachable_database_is_one_line_naming_the_url(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/inferq"
    for args in (("keys", "create", "someone"), ("migrate",)):
        result = inferq(*args, cwd=tmp_path, INFERQ_DATABASE_URL=url)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert url in lines[0] and "INFERQ_DATABASE_URL" in lines[0]


def test_submit_without_an_api_is_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = inferq("submit", "hello", cwd=tmp_path, INFERQ_API_URL=url, INFERQ_API_KEY="iq_x")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: cannot reach the inferq API at {url} (ConnectError); is it running? "
        "Set INFERQ_API_URL or --url."
    ]


def test_submit_help_names_its_variables(tmp_path: Path) -> None:
    help_text = inferq("submit", "--help", cwd=tmp_path).stdout
    assert "INFERQ_API_URL" in help_text and "INFERQ_API_KEY" in help_text


def test_beat_keeps_its_schedule_in_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from inferq import cli

    calls: list[list[str]] = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_exec_celery", calls.append)
    result = CliRunner().invoke(cli.main, ["beat"], env={"INFERQ_DATA_DIR": "data"})
    assert result.exit_code == 0, result.output
    schedule = calls[0][calls[0].index("--schedule") + 1]
    assert Path(schedule).parent.resolve() == (tmp_path / "data").resolve()


def test_stats_prints_the_tenants_figures_as_a_table_or_as_json(
    platform: Platform, tmp_path: Path
) -> None:
    key = platform.new_key(f"stats-cli-{uuid.uuid4().hex[:8]}")
    with platform.client(key) as http:
        job = submit(http, prompt=f"stats cli {uuid.uuid4().hex}", max_tokens=5, user="dana")
        wait_for(http, job["id"])
        api_rows = http.get("/v1/stats", params={"group_by": "model"}).json()["data"]
    env = {"INFERQ_API_URL": platform.api_url, "INFERQ_API_KEY": key}
    table = inferq("stats", "--group-by", "model,user", cwd=tmp_path, **env)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:4] == ["model", "user", "jobs", "succeeded"]
    assert row.split()[:4] == ["sim", "dana", "1", "1"]
    as_json = inferq("stats", "--group-by", "model", "--json", cwd=tmp_path, **env)
    assert json.loads(as_json.stdout) == api_rows
    bad = inferq("stats", "--from", "someday", cwd=tmp_path, **env)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: invalid_request: from")
