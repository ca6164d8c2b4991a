"""The `inferq` command: each process by module path, plus keys, submit and `up`."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from inferq import instance, tools
from inferq.registry import ModelsFileError, Registry, queue_prefix_of
from inferq.settings import get_settings

if TYPE_CHECKING:
    from inferq.models import ApiKey

T = TypeVar("T")


def _exec_module(module: str, args: list[str], env: dict[str, str] | None = None) -> None:
    """Replace this process with `python -m MODULE ARGS`."""
    # Ctrl-C stops it even where SIGINT was inherited as ignored (a shell's background job).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    argv = [sys.executable, "-m", module, *args]
    os.execve(sys.executable, argv, os.environ if env is None else env)


def _exec_celery(args: list[str]) -> None:
    """Replace this process with Celery on the workers' app (started by module path)."""
    _exec_module("celery", ["-A", "workers.app:app", *args])


def _exec_tool(tool: tools.Tool, args: list[str]) -> None:
    """Replace this process with the tool, or say in one line where it is to be found."""
    env = tools.environment(tool)
    if env is None:
        click.echo(tool.missing(), err=True)
        sys.exit(1)
    _exec_module(tool.module, args, env)


# The tools parse their own options, --help included: everything after the name is theirs.
TOOL_SETTINGS = {"ignore_unknown_options": True, "allow_extra_args": True}


# Commands that start their own servers do not join a running `inferq up`.
SELF_CONTAINED = {"up", "sim", "bench"}


@click.group()
@click.pass_context
def main(ctx: click.Context) -> None:
    """inferq: queue-backed asynchronous LLM inference.

    Run from a project where `inferq up` is running, every command reaches its database,
    Redis and API unless INFERQ_* variables say otherwise.
    """
    if ctx.invoked_subcommand not in SELF_CONTAINED:
        instance.adopt(instance.data_dir())


def _database_url() -> str:
    return get_settings().database_url


def _unreachable(url: str, exc: Exception) -> click.ClickException:
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return click.ClickException(
        f"cannot reach Postgres at {_safe(url)}: {reason}. "
        "Start `inferq up` in this directory, or set INFERQ_DATABASE_URL."
    )


def _registry() -> Registry:
    """The models file, or the one line that says what is wrong with it."""
    settings = get_settings()
    try:
        return Registry.load(settings.models_file, queue_prefix=queue_prefix_of(settings))
    except ModelsFileError as exc:
        raise click.ClickException(str(exc)) from None


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--workers", default=1, show_default=True, help="uvicorn worker processes")
def api(host: str, port: int, workers: int) -> None:
    """Serve the HTTP API."""
    import uvicorn

    _registry()  # a bad models file stops here, in one line, before any server starts

    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


@main.command()
@click.option("--models", default="", help="comma-separated model names (default: all)")
@click.option("--concurrency", default=16, show_default=True, help="generation threads")
@click.option("--name", default=None, help="Celery node name")
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=None,
    help="worker processes sharing the concurrency, one Celery node each "
    "[default: one per 32 streams, up to the cores]",
)
def worker(models: str, concurrency: int, name: str | None, processes: int | None) -> None:
    """Run a Celery worker (threads pool) for the models' queues (under the deployment's prefix)."""
    registry = _registry()
    names = [m for m in models.split(",") if m] or registry.names()
    unknown = [m for m in names if registry.get(m) is None]
    if unknown:
        raise click.BadParameter(
            f"not in the models file: {', '.join(unknown)}", param_hint="--models"
        )
    queues = ",".join(registry.get(m).queue for m in names)  # type: ignore[union-attr]
    from workers import nodes

    args = nodes.celery_args(queues, concurrency)
    count = processes or nodes.default_processes(concurrency)
    if count == 1:
        if name:
            args += ["-n", name]
        _exec_celery(args)
        return
    commands = []
    for threads, node in zip(
        nodes.split(concurrency, count), nodes.node_names(name, count), strict=True
    ):
        node_args = [*args, "-n", node]
        node_args[node_args.index("-c") + 1] = str(threads)
        commands.append(["-A", "workers.app:app", *node_args])
    sys.exit(nodes.run_nodes(commands))


@main.command()
@click.option("--schedule", default=None, help="beat schedule file")
def beat(schedule: str | None) -> None:
    """Run the scheduler (and the sweeper); its schedule file lives in the data dir."""
    if schedule is None:
        directory = instance.data_dir()
        directory.mkdir(parents=True, exist_ok=True)
        schedule = str(directory / "beat-schedule")
    _exec_celery(["beat", "--loglevel", "WARNING", "--schedule", schedule])


@main.command()
@click.option("--port", default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True)
def flower(port: int, address: str) -> None:
    """Run Flower (queue health) behind basic auth."""
    auth = get_settings().flower_basic_auth.get_secret_value()
    _exec_celery(["flower", f"--port={port}", f"--address={address}", f"--basic-auth={auth}"])


@main.command(context_settings=TOOL_SETTINGS, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sim(args: tuple[str, ...]) -> None:
    """Serve the TGI-protocol simulator.

    Runs `python -m sim` from the source tree, which parses the options (--help lists them).
    """
    _exec_tool(tools.SIM, list(args))


@main.command()
def migrate() -> None:
    """Create the database if it is missing, then apply migrations (alembic upgrade head).

    With INFERQ_GRAFANA_DB_PASSWORD set, then create or update Grafana's read-only role.
    """
    from sqlalchemy.exc import OperationalError

    from inferq.migrate import create_database_if_missing, upgrade

    url = _database_url()
    try:
        if create_database_if_missing(url):
            click.echo(f"created database {_safe(url)}")
        upgrade(url)
    except OperationalError as exc:
        raise _unreachable(url, exc) from None
    click.echo("database is at the latest migration")
    password = get_settings().grafana_db_password
    if password is not None:
        _grafana_reader(url, password.get_secret_value())


def _grafana_reader(url: str, password: str) -> None:
    """Create or update Grafana's read-only role (inferq.grafana)."""
    import psycopg

    from inferq.grafana import READER_ROLE, ensure_reader

    try:
        created = ensure_reader(url, password)
    except (psycopg.Error, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise click.ClickException(
            f"cannot make Grafana's role {READER_ROLE}: {reason}. The database's user needs "
            "CREATEROLE; or have its owner run deploy/grafana/sql/reader.sql and unset "
            "INFERQ_GRAFANA_DB_PASSWORD"
        ) from None
    click.echo(f"role {READER_ROLE} {'created' if created else 'updated'} (read-only, for Grafana)")


@main.group()
def keys() -> None:
    """Manage API keys (every tenant's: the command line holds the database's credentials)."""


# Sent for a limit, `none` clears it (`keys update`); a limit is otherwise a positive number.
CLEAR = "none"
# What the columns hold (integer; numeric(12, 4)).
MAX_COUNT = 2**31 - 1
MAX_BUDGET = Decimal("99999999.9999")


class LimitType(click.ParamType[object]):
    """A key's limit: a positive count (a budget: dollars, 0 allowed), or `none`."""

    def __init__(self, budget: bool = False) -> None:
        self.budget = budget
        self.name = "dollars|none" if budget else "count|none"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> object:
        if str(value).lower() == CLEAR:
            return CLEAR
        try:
            number = Decimal(str(value)) if self.budget else int(str(value))
        except (ValueError, ArithmeticError):
            self.fail(f"{value!r} is not a number (or `{CLEAR}`)", param, ctx)
        low, high = (0, MAX_BUDGET) if self.budget else (1, MAX_COUNT)
        if (isinstance(number, Decimal) and not number.is_finite()) or not low <= number <= high:
            self.fail(f"{value!r} is not between {low} and {high}", param, ctx)
        return number


LIMIT_OPTIONS = (
    ("--rate-limit-per-minute", "rate_limit_per_minute", False, "requests per minute"),
    ("--tokens-per-minute", "tokens_per_minute", False, "tokens (input + output) per minute"),
    ("--daily-budget-usd", "daily_budget_usd", True, "spend per UTC day, in US dollars"),
    ("--max-queued", "max_queued", False, "jobs queued at once"),
)


def _limit_options(command: Callable[..., None]) -> Callable[..., None]:
    for flag, name, budget, words in reversed(LIMIT_OPTIONS):
        command = click.option(
            flag, name, type=LimitType(budget), help=f"{words}; `none`: no limit"
        )(command)
    return command


def _given(options: dict[str, object]) -> dict[str, object]:
    """The options given, `none` as None (no limit)."""
    return {k: None if v == CLEAR else v for k, v in options.items() if v is not None}


def _in_database(action: Callable[[str], T]) -> T:
    """`action(database_url)`, its database failures in one line."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    url = _database_url()
    try:
        return action(url)
    except OperationalError as exc:
        raise _unreachable(url, exc) from None
    except ProgrammingError:
        raise click.ClickException(
            f"the database at {_safe(url)} has no inferq tables (or not the latest): "
            "run `inferq migrate`"
        ) from None


KEY_COLUMNS = (
    "ID",
    "NAME",
    "TENANT",
    "ADMIN",
    "PREFIX",
    "REQ/MIN",
    "TOK/MIN",
    "USD/DAY",
    "QUEUED",
    "CREATED",
    "REVOKED",
)


def key_table(rows: list[ApiKey]) -> str:
    """Keys as an aligned table; `-` for no limit."""

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, datetime):
            return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        return str(value)

    lines = [list(KEY_COLUMNS)]
    for row in rows:
        values = (
            row.id,
            row.name,
            row.tenant,
            "yes" if row.admin else "no",
            row.prefix,
            row.rate_limit_per_minute,
            row.tokens_per_minute,
            row.daily_budget_usd,
            row.max_queued,
            row.created_at,
            row.revoked_at,
        )
        lines.append([cell(v) for v in values])
    widths = [max(len(line[i]) for line in lines) for i in range(len(KEY_COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _tenant(_ctx: click.Context, _param: click.Parameter, tenant: str) -> str:
    from inferq.judge import RESERVED_TENANT_PREFIX, is_reserved_tenant

    if is_reserved_tenant(tenant):
        raise click.BadParameter(f"names starting with {RESERVED_TENANT_PREFIX!r} are reserved")
    return tenant


@keys.command("create")
@click.argument("name")
@click.option("--tenant", default="default", show_default=True, callback=_tenant)
@click.option("--admin", is_flag=True, help="may manage the tenant's keys")
@_limit_options
def keys_create(name: str, tenant: str, admin: bool, **limits: object) -> None:
    """Create a key and print its secret (shown this once)."""
    from inferq.admin import Limits, create_key

    chosen = Limits(**_given(limits))  # type: ignore[arg-type]
    click.echo(_in_database(lambda url: create_key(url, name, tenant, admin, chosen)))


@keys.command("list")
@click.option("--tenant", default=None, help="only this tenant's keys")
def keys_list(tenant: str | None) -> None:
    """List keys, newest first (never their secrets)."""
    from inferq.admin import list_keys

    click.echo(key_table(_in_database(lambda url: list_keys(url, tenant))))


@keys.command("update")
@click.argument("key_id", type=click.UUID)
@click.option("--name", default=None, help="a new name")
@_limit_options
def keys_update(key_id: uuid.UUID, name: str | None, **limits: object) -> None:
    """Rename a key or change its limits (API processes apply it within 5 s)."""
    from inferq.admin import KeyChanges, update_key

    given = _given({"name": name, **limits})
    if not given:
        raise click.UsageError("nothing to change: give --name or a limit")
    if given.get("name") == "":
        raise click.BadParameter("a key's name cannot be empty", param_hint="--name")
    changes = KeyChanges(frozenset(given), **given)  # type: ignore[arg-type]
    row = _in_database(lambda url: update_key(url, key_id, changes))
    if row is None:
        raise click.ClickException(f"no key {key_id}")
    click.echo(key_table([row]))


@keys.command("revoke")
@click.argument("key_id", type=click.UUID)
def keys_revoke(key_id: uuid.UUID) -> None:
    """Revoke a key: API processes refuse it within 5 s. Revoking again changes nothing."""
    from inferq.admin import revoke_key

    row = _in_database(lambda url: revoke_key(url, key_id))
    if row is None:
        raise click.ClickException(f"no key {key_id}")
    when = row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else "?"
    click.echo(f"revoked {key_id} ({row.name}, tenant {row.tenant}) at {when}")


def _api_options(command: Callable[..., None]) -> Callable[..., None]:
    """--url and --key: where the API is and the key to call it with (both found on their own
    where `inferq up` runs)."""
    command = click.option(
        "--key", envvar="INFERQ_API_KEY", required=True, show_envvar=True, help="API key"
    )(command)
    return click.option(
        "--url",
        envvar="INFERQ_API_URL",
        default="http://127.0.0.1:8000",
        show_default=True,
        show_envvar=True,
        help="the API's base URL",
    )(command)


@main.command()
@click.argument("prompt")
@click.option("--model", default="sim", show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--stream", is_flag=True, help="print tokens as they arrive")
@_api_options
@click.option("--json", "as_json", is_flag=True, help="print the finished job as JSON")
def submit(
    prompt: str, model: str, max_tokens: int, stream: bool, url: str, key: str, as_json: bool
) -> None:
    """Submit a prompt and print the output.

    Run where `inferq up` is running, the API's URL and the development key are found on
    their own; elsewhere set INFERQ_API_URL and INFERQ_API_KEY (or --url and --key).
    """
    from inferq.client import submit_and_print

    sys.exit(submit_and_print(url, key, prompt, model, max_tokens, stream, as_json))


@main.command()
@click.option(
    "--from", "first", default=None, help="first UTC day, YYYY-MM-DD (default: 6 days before --to)"
)
@click.option("--to", "last", default=None, help="last UTC day, inclusive (default: today)")
@click.option("--group-by", default="", help="comma-separated: any of model, key, user, day")
@_api_options
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
def stats(
    first: str | None, last: str | None, group_by: str, url: str, key: str, as_json: bool
) -> None:
    """Print the tenant's jobs, outcomes, cost, feedback and timings (GET /v1/stats).

    One row per group (one row in all without --group-by). The key decides the tenant.
    """
    from inferq.stats_table import print_stats

    sys.exit(print_stats(url, key, first, last, group_by, as_json))


@main.command()
@click.option("--port", default=8000, show_default=True, help="the API's port")
@click.option("--models", "models_file", type=click.Path(exists=True, path_type=Path))
@click.option("--data-dir", default=".inferq", show_default=True, type=click.Path(path_type=Path))
@click.option("--concurrency", default=32, show_default=True)
@click.option("--sim-port", default=8081, show_default=True)
@click.option("--flower-port", default=5555, show_default=True)
def up(
    port: int,
    models_file: Path | None,
    data_dir: Path,
    concurrency: int,
    sim_port: int,
    flower_port: int,
) -> None:
    """Run everything on embedded Postgres and Redis, with the simulator."""
    from inferq.standalone import Ports, run_standalone

    ports = Ports(api=port, sim=sim_port, flower=flower_port)
    sys.exit(run_standalone(ports, models_file, data_dir, concurrency))


@main.command(context_settings=TOOL_SETTINGS, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Measure the platform against its backend: stream, submit, fan-out, scale.

    Runs `python -m bench` from the source tree, which parses the options (--help lists them).
    """
    _exec_tool(tools.BENCH, list(args))
