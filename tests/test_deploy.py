"""Deployment files: Dockerfile, docker-compose, nginx, Kubernetes, Prometheus, Grafana.

Checks in plain Python always run. Checks that need a tool (docker compose or
docker-compose, nginx, promtool, kubectl, kubernetes-validate, check-jsonschema,
hadolint) skip with a reason when the tool is missing. This module uses no
fixture from conftest.py.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from inferq.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
NGINX_CONF = DEPLOY / "nginx.conf"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "inferq.json"
GEN_ENV = DEPLOY / "gen-env"

# The only commands an inferq container may run.
CLI_COMMANDS = [
    re.compile(p)
    for p in (
        r"inferq migrate",
        r"inferq api --host 0\.0\.0\.0 --port 8000( --workers [1-9][0-9]*)?",
        r"inferq worker --models [a-z0-9][\w.-]*(,[a-z0-9][\w.-]*)* --concurrency [1-9][0-9]*",
        r"inferq beat",
        # Flower and the simulator listen on loopback unless told otherwise.
        r"inferq flower( --address 0\.0\.0\.0)? --port 5555",
        r"inferq sim( --host 0\.0\.0\.0)? --port 8081",
    )
]

# Metric names the dashboards and rules may use (the platform's, Flower's, Prometheus's).
METRICS = {
    "inferq_jobs_submitted_total",
    "inferq_jobs_finished_total",
    "inferq_queue_wait_seconds_bucket",
    "inferq_ttft_seconds_bucket",
    "inferq_job_duration_seconds_bucket",
    "inferq_output_tokens_total",
    "inferq_cost_usd_total",
    "inferq_queue_depth",
    "inferq_sse_connections",
    "inferq_backend_errors_total",
    "inferq_sweeper_last_run_timestamp_seconds",
    "inferq_feedback_total",
    "inferq_judge_score_sum",
    "inferq_judge_score_count",
    "inferq_judge_verdicts_total",
    "flower_worker_online",
    "up",
}
# Secrets compose takes from .env, written by deploy/gen-env; the operator UIs it publishes.
GENERATED_SECRETS = (
    "INFERQ_BOOTSTRAP_KEY",
    "POSTGRES_PASSWORD",
    "INFERQ_FLOWER_BASIC_AUTH",
    "GRAFANA_ADMIN_PASSWORD",
    "GRAFANA_DB_PASSWORD",
)
OPERATOR_UIS = ("flower", "prometheus", "grafana")
LOOPBACK = {"127.0.0.1", "::1"}
SSE_PATHS = ["/v1/jobs/0190b7e2/events", "/v1/chat/completions", "/v1/completions"]
K8S_MIN_VERSION = "1.30.0"
INFERQ_IMAGE = re.compile(r"^(\$\{INFERQ_IMAGE:-)?([\w.-]+/)*inferq(:[\w.-]+)?\}?$")


# ---------------------------------------------------------------- helpers


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open() as f:
        return yaml.safe_load(f)


def compose_services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def is_cli_command(argv: list[str]) -> bool:
    line = " ".join(str(a) for a in argv)
    return any(p.fullmatch(line) for p in CLI_COMMANDS)


def option(argv: list[str], name: str) -> str:
    return str(argv[argv.index(name) + 1])


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kw)


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"{proc.args}:\n{proc.stdout}\n{proc.stderr}"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def python_tool(module: str) -> list[str]:
    """Run a Python CLI as `python -m module` from this interpreter's environment."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"Python package providing {module} is not installed")
    return [sys.executable, "-m", module]


def tool_in_env(name: str) -> str:
    """A console script of this interpreter's environment, else one on PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else require_tool(name)


def image_entrypoint() -> list[str]:
    entry = [ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("ENTRYPOINT")]
    return json.loads(entry[-1].removeprefix("ENTRYPOINT"))


def models_file(text: str) -> dict[str, dict[str, Any]]:
    return tomllib.loads(text)["models"]


def compose_models() -> dict[str, dict[str, Any]]:
    return models_file((DEPLOY / "models.compose.toml").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_one_non_root_image_with_inferq_entrypoint() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert stages and stages[-1] == "python:3.11-slim"
    assert image_entrypoint() == ["inferq"]
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"^RUN .*pip install \.$", text, re.M)
    # `pip install .` needs every package that pyproject.toml ships.
    with (ROOT / "pyproject.toml").open("rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in (p.rstrip("*") for p in include):
        assert re.search(rf"^COPY {package} \./{package}$", text, re.M), package


def test_dockerignore_admits_every_copied_path() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    admitted = {p.strip("!/") for p in ignore if p.startswith("!")}
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M)
    for sources in copied:
        for src in sources.split():
            assert src in admitted, f"{src} is copied but excluded from the build context"


def test_dockerfile_passes_hadolint() -> None:
    assert_ok(run([tool_in_env("hadolint"), str(DOCKERFILE)]))


# ---------------------------------------------------------------- docker-compose


def inferq_services() -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose_services().items()
        if INFERQ_IMAGE.match(str(svc.get("image", "")))
    }


def test_compose_has_every_process_and_dependency() -> None:
    expected = {
        "postgres",
        "redis",
        "migrate",
        "api",
        "nginx",
        "sim",
        "worker",
        "beat",
        "flower",
        "tgi",
        "prometheus",
        "grafana",
    }
    assert expected <= set(compose_services())
    assert {"migrate", "api", "sim", "worker", "beat", "flower"} <= set(inferq_services())


def test_compose_inferq_services_run_exactly_the_cli_commands() -> None:
    entry = image_entrypoint()
    for name, svc in inferq_services().items():
        assert "entrypoint" not in svc, name
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile", name
        argv = entry + svc["command"]
        assert is_cli_command(argv), f"{name}: {argv}"


def test_compose_workers_serve_models_of_the_mounted_models_file() -> None:
    models = compose_models()
    for name, svc in inferq_services().items():
        assert "./deploy/models.compose.toml:/etc/inferq/models.toml:ro" in svc["volumes"]
        assert svc["environment"]["INFERQ_MODELS_FILE"] == "/etc/inferq/models.toml"
        if svc["command"][0] == "worker":
            for model in option(svc["command"], "--models").split(","):
                assert model in models, f"{name} serves unknown model {model}"


def test_compose_models_point_at_sim_and_tgi_services() -> None:
    services = compose_services()
    models = compose_models()
    assert models["sim"]["url"] == "http://sim:8081"
    assert models["small"]["url"] == "http://tgi:80"  # the model's name, as in Kubernetes
    for name, model in models.items():
        assert model["backend"] in {"tgi", "openai"}, name
        assert model["url"].split("//")[1].split(":")[0] in services, name
        for key in (
            "max_tokens",
            "context_tokens",
            "price_input_per_mtok",
            "price_output_per_mtok",
        ):
            assert isinstance(model[key], int | float), (name, key)


def test_compose_runs_without_gpu_by_default() -> None:
    services = compose_services()
    default = {n for n, s in services.items() if not s.get("profiles")}
    assert {"sim", "worker", "api", "nginx", "beat", "flower"} <= default
    assert services["tgi"]["profiles"] == ["gpu"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    # The default worker serves the simulator; the GPU worker serves TGI.
    worker = services["worker"]
    assert option(worker["command"], "--models") == "sim"
    assert worker["depends_on"]["sim"]["condition"] == "service_healthy"
    gpu_workers = [s for s in services.values() if "tgi" in s.get("depends_on", {})]
    assert gpu_workers and all(s.get("profiles") == ["gpu"] for s in gpu_workers)
    assert all(option(s["command"], "--models") == "small" for s in gpu_workers)
    for name, svc in services.items():
        has_gpu = "reservations" in svc.get("deploy", {}).get("resources", {})
        assert has_gpu == (name == "tgi"), name


def test_compose_tgi_reserves_a_gpu_for_a_small_model() -> None:
    tgi = compose_services()["tgi"]
    assert "ghcr.io/huggingface/text-generation-inference:" in tgi["image"]
    devices = tgi["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "--model-id" in tgi["command"]


def test_compose_startup_order_waits_for_health_and_migrations() -> None:
    services = compose_services()
    pg, redis = services["postgres"], services["redis"]
    assert pg["image"] == "postgres:16" and "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert redis["image"] == "redis:7"
    assert "redis-cli" in redis["healthcheck"]["test"]
    cmd = " ".join(redis["command"])
    assert "--maxmemory-policy noeviction" in cmd and "--appendonly yes" in cmd
    migrate = services["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "beat"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
    assert services["api"]["deploy"]["replicas"] >= 2
    assert services["nginx"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_compose_exposes_nginx_and_flower_with_basic_auth() -> None:
    services = compose_services()
    nginx = services["nginx"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert nginx["ports"] == ["${INFERQ_HTTP_PORT:-8080}:8080"]
    assert "ports" not in services["api"]  # replicas are reached through nginx only
    flower = services["flower"]
    assert flower["ports"] == ["127.0.0.1:${INFERQ_FLOWER_PORT:-5555}:5555"]
    assert "INFERQ_FLOWER_BASIC_AUTH" in flower["environment"]


def host_ip(port: str | dict[str, Any]) -> str:
    """The host address a published port binds ("" for every interface), short or long form."""
    if isinstance(port, dict):
        return str(port.get("host_ip", ""))
    spec = re.sub(r"\$\{[^}]*\}", "0", str(port))  # `${PORT:-5555}` holds a colon
    if spec.startswith("["):  # [::1]:5555:5555
        return spec[1 : spec.index("]")]
    parts = spec.split(":")
    return parts[0] if len(parts) == 3 else ""


def test_compose_publishes_only_the_api_on_public_interfaces() -> None:
    for name, svc in compose_services().items():
        for port in svc.get("ports", []):
            if name != "nginx":
                assert host_ip(port) in LOOPBACK, f"{name} publishes {port} on every interface"
    for ui in OPERATOR_UIS:
        assert compose_services()[ui]["ports"], ui


def test_compose_secrets_have_no_defaults() -> None:
    text = COMPOSE_FILE.read_text()
    for name in GENERATED_SECRETS:
        uses = re.findall(rf"\$\{{{name}(\W[^}}]*)?\}}", text)
        assert uses, f"{name} is not used"
        # `${NAME:?message}`: compose stops with the message while the secret is unset or empty.
        assert all(u.startswith(":?") and "deploy/gen-env" in u for u in uses), (name, uses)
    for default in ("change-me", "admin:inferq", ":-inferq}"):
        assert default not in text, default
    env = compose_services()["api"]["environment"]
    assert env["INFERQ_ENVIRONMENT"] == "${INFERQ_ENVIRONMENT:-production}"


def test_compose_bind_mounts_exist() -> None:
    for name, svc in compose_services().items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"


def compose_cli() -> list[str]:
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor docker-compose is installed")


def compose_env() -> dict[str, str]:
    # Interpolation must not depend on the caller's environment (nor on a developer's .env:
    # each run names its own --env-file).
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("INFERQ_", "COMPOSE_")) and k not in GENERATED_SECRETS
    }


def compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    cli = [*compose_cli(), "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
    return run(
        [*cli, "--profile", "gpu", "--profile", "monitoring", "config"], cwd=ROOT, env=compose_env()
    )


def test_compose_config_is_valid_and_renders_the_cli_commands(tmp_path: Path) -> None:
    proc = compose_config(generated_env(tmp_path / ".env"))
    assert_ok(proc)
    # What the tool made of anchors, merges and interpolation.
    rendered = yaml.safe_load(proc.stdout)["services"]
    assert set(rendered) == set(compose_services())
    entry = image_entrypoint()
    for name in inferq_services():
        assert is_cli_command(entry + rendered[name]["command"]), name
    assert rendered["tgi"]["profiles"] == ["gpu"]
    assert not rendered["sim"].get("profiles") and not rendered["worker"].get("profiles")
    for name, svc in rendered.items():
        for port in svc.get("ports", []):
            assert name == "nginx" or host_ip(port) in LOOPBACK, (name, port)


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    empty = tmp_path / ".env"
    empty.write_text("")
    proc = compose_config(empty)
    assert proc.returncode != 0
    assert "run deploy/gen-env" in proc.stderr + proc.stdout


# ---------------------------------------------------------------- secrets


def generated_env(path: Path) -> Path:
    assert_ok(run([sys.executable, str(GEN_ENV), str(path)]))
    return path


def env_file(path: Path) -> dict[str, str]:
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    return dict(ln.split("=", 1) for ln in lines)


def test_gen_env_writes_random_private_secrets(tmp_path: Path) -> None:
    one, two = env_file(generated_env(tmp_path / "a")), env_file(generated_env(tmp_path / "b"))
    assert set(one) == set(GENERATED_SECRETS) == set(two)
    for name in GENERATED_SECRETS:
        assert len(one[name]) >= 32 and one[name] != two[name], name
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o600
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_gen_env_keeps_existing_secrets(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("POSTGRES_PASSWORD=already-in-the-volume\n")
    secrets = env_file(generated_env(path))
    assert secrets["POSTGRES_PASSWORD"] == "already-in-the-volume"
    assert set(secrets) == set(GENERATED_SECRETS)
    assert env_file(generated_env(path)) == secrets


def test_production_accepts_the_generated_secrets(tmp_path: Path) -> None:
    env = env_file(generated_env(tmp_path / ".env"))
    settings = production(
        bootstrap_key=env["INFERQ_BOOTSTRAP_KEY"],
        flower_basic_auth=env["INFERQ_FLOWER_BASIC_AUTH"],
        database_url=f"postgresql://inferq:{env['POSTGRES_PASSWORD']}@postgres:5432/inferq",
    )
    assert settings.environment == "production"


def production(**values: Any) -> Settings:
    # No INFERQ_* variable or .env file of the caller's may fill in a field.
    return Settings(_env_file=None, environment="production", **values)  # type: ignore[call-arg]


OWN = {"flower_basic_auth": "ops:Tq8vL2mZ0xYc4nR7"}


@pytest.mark.parametrize(
    ("field", "value", "variable"),
    [
        ("flower_basic_auth", "admin:inferq", "INFERQ_FLOWER_BASIC_AUTH"),
        ("flower_basic_auth", "ops:Tq8vL2mZ0xYc4nR7,admin:admin", "INFERQ_FLOWER_BASIC_AUTH"),
        ("bootstrap_key", "iq-compose-bootstrap-change-me", "INFERQ_BOOTSTRAP_KEY"),
        ("bootstrap_key", "change-me-to-a-long-random-admin-key", "INFERQ_BOOTSTRAP_KEY"),
        ("bootstrap_key", "", "INFERQ_BOOTSTRAP_KEY"),
        ("database_url", "postgresql://inferq:inferq@postgres:5432/inferq", "INFERQ_DATABASE_URL"),
        ("database_url", "postgresql+psycopg://postgres:postgres@db/inferq", "INFERQ_DATABASE_URL"),
        ("database_url", "postgresql://inferq:@db/inferq", "INFERQ_DATABASE_URL"),
        ("redis_url", "redis://:change-me@redis:6379/0", "INFERQ_REDIS_URL"),
        ("broker_url", "redis://default:redis@broker:6379/0", "INFERQ_BROKER_URL"),
        ("grafana_db_password", "change-me", "INFERQ_GRAFANA_DB_PASSWORD"),
        ("grafana_db_password", "", "INFERQ_GRAFANA_DB_PASSWORD"),
    ],
)
def test_production_refuses_a_default_secret(field: str, value: str, variable: str) -> None:
    with pytest.raises(ValueError, match=variable) as refused:
        production(**{**OWN, field: value})
    assert value not in str(refused.value) or not value  # the error never echoes a secret
    Settings(_env_file=None, environment="development", **{**OWN, field: value})  # type: ignore[call-arg]


def test_production_refuses_the_kubernetes_example_secret() -> None:
    (secret,) = load_yaml_docs(K8S / "secret.example.yaml")
    values = {k.removeprefix("INFERQ_").lower(): v for k, v in secret["stringData"].items()}
    values.pop("hf_token")
    with pytest.raises(ValueError) as refused:
        production(**values)
    for name in (
        "BOOTSTRAP_KEY",
        "FLOWER_BASIC_AUTH",
        "DATABASE_URL",
        "REDIS_URL",
        "GRAFANA_DB_PASSWORD",
    ):
        assert f"INFERQ_{name}" in str(refused.value), name


def test_production_accepts_a_url_without_password() -> None:
    """Certificates, a .pgpass file or IAM may authenticate instead."""
    assert production(**OWN, database_url="postgresql://inferq@db/inferq").database_url


def test_compose_matches_the_compose_specification_schema() -> None:
    cmd = python_tool("check_jsonschema")
    assert_ok(run([*cmd, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)]))


# ---------------------------------------------------------------- nginx


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def find(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]


NGINX_TOKEN = re.compile(r"""#[^\n]*|"(?:\\.|[^"])*"|'(?:\\.|[^'])*'|[{};]|[^\s{};]+""")


def parse_nginx(text: str) -> Directive:
    tokens = [t for t in NGINX_TOKEN.findall(text) if not t.startswith("#")]
    root = Directive("main", [], [])
    stack, words = [root], []
    for tok in tokens:
        if tok == ";":
            stack[-1].block.append(Directive(words[0], words[1:]))
            words = []
        elif tok == "{":
            child = Directive(words[0], words[1:], [])
            stack[-1].block.append(child)
            stack.append(child)
            words = []
        elif tok == "}":
            stack.pop()
        else:
            words.append(tok.strip("\"'") if tok[0] in "\"'" else tok)
    assert len(stack) == 1 and not words, "unbalanced nginx configuration"
    return root


def walk(block: Directive) -> Iterator[Directive]:
    for d in block.block or []:
        yield d
        yield from walk(d)


def nginx_server() -> Directive:
    http = parse_nginx(NGINX_CONF.read_text()).find("http")[0]
    return http.find("server")[0]


def nginx_location_for(server: Directive, path: str) -> Directive:
    """The location nginx picks for a path (exact, then regex in order, then prefix)."""
    locations = server.find("location")
    for loc in locations:
        if loc.args[0] == "=" and loc.args[1] == path:
            return loc
    for loc in locations:
        if loc.args[0] in {"~", "~*"}:
            flags = re.I if loc.args[0] == "~*" else 0
            if re.search(loc.args[1], path, flags):
                return loc
    prefixes = [loc for loc in locations if len(loc.args) == 1 and path.startswith(loc.args[0])]
    return max(prefixes, key=lambda loc: len(loc.args[0]))


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value).groups()
    return int(number) * units[unit or "s"]


def headers_set(block: Directive) -> dict[str, str]:
    return {d.args[0].lower(): d.args[1] for d in block.find("proxy_set_header")}


@pytest.mark.parametrize("path", SSE_PATHS)
def test_nginx_sse_locations_stream_unbuffered(path: str) -> None:
    server = nginx_server()
    loc = nginx_location_for(server, path)
    values = {d.name: d.args for d in loc.block}
    assert values["proxy_pass"] == ["http://inferq_api"]
    assert values["proxy_buffering"] == ["off"]
    assert values["proxy_cache"] == ["off"]
    assert values["proxy_http_version"] == ["1.1"]
    assert seconds(values["proxy_read_timeout"][0]) >= 3600
    headers = headers_set(loc)
    assert headers["connection"] == ""
    assert headers["last-event-id"] == "$http_last_event_id"
    # A location that sets any header inherits none from the server: repeat them all.
    assert headers_set(server).items() <= headers.items()


def test_nginx_honours_x_accel_buffering_and_hides_metrics() -> None:
    root = parse_nginx(NGINX_CONF.read_text())
    assert "proxy_ignore_headers" not in {d.name for d in walk(root)}
    http = root.find("http")[0]
    assert http.find("client_max_body_size")
    upstream = http.find("upstream")[0]
    assert upstream.args == ["inferq_api"]
    assert upstream.find("server")[0].args[0] == "api:8000"
    assert nginx_location_for(nginx_server(), "/metrics").find("return")[0].args == ["404"]
    default = nginx_location_for(nginx_server(), "/v1/models")
    assert default.args == ["/"]


def render_nginx_conf(tmp: Path, listen: int, upstream: int) -> Path:
    """The shipped config with local addresses and writable paths."""
    text = NGINX_CONF.read_text()
    replacements = [
        ("server api:8000", f"server 127.0.0.1:{upstream}"),
        ("listen 8080;", f"listen 127.0.0.1:{listen};"),
        ("error_log /dev/stderr warn;", f"error_log {tmp}/error.log warn;"),
        ("access_log /dev/stdout main;", f"access_log {tmp}/access.log main;"),
        (
            "http {",
            "http {\n"
            + "".join(
                f"    {kind}_temp_path {tmp}/{kind};\n"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            ),
        ),
    ]
    for old, new in replacements:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path


def nginx_main_args(tmp: Path) -> str:
    user = "user root;" if os.geteuid() == 0 else ""  # workers read the temp dirs
    return f"pid {tmp}/nginx.pid; {user}"


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = require_tool("nginx")
    conf = render_nginx_conf(tmp_path, free_port(), free_port())
    assert_ok(
        run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-g", nginx_main_args(tmp_path)])
    )


@dataclass
class Upstream:
    """A stand-in API: sends one event, then holds the stream until released.

    `?framing=chunked` answers like uvicorn (HTTP/1.1, chunked); otherwise the
    answer is HTTP/1.0 with the body running until close, the framing under
    which nginx visibly holds a buffered response back until the upstream ends.
    `?accel=no` adds `X-Accel-Buffering: no`, as the API's SSE responses do.
    """

    port: int
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)


def start_upstream() -> tuple[ThreadingHTTPServer, Upstream]:
    state = Upstream(port=0)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def send_part(self, data: bytes, chunked: bool) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            self.wfile.flush()

        def handle_one(self) -> None:
            state.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            chunked = "framing=chunked" in self.path
            self.protocol_version = "HTTP/1.1" if chunked else "HTTP/1.0"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            if "accel=no" in self.path:
                self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            self.send_part(b'id: 1-0\nevent: token\ndata: {"text": "a"}\n\n', chunked)
            state.release.wait(10)
            self.send_part(b'id: 2-0\nevent: done\ndata: {"status": "succeeded"}\n\n', chunked)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.close_connection = True

        do_GET = do_POST = handle_one

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[int, Upstream]]:
    """The shipped nginx.conf running in front of a stand-in API."""
    nginx = require_tool("nginx")
    server, upstream = start_upstream()
    port = free_port()
    conf = render_nginx_conf(tmp_path, port, upstream.port)
    main_args = "daemon off; " + nginx_main_args(tmp_path)
    proc = subprocess.Popen(
        [nginx, "-p", str(tmp_path), "-c", str(conf), "-g", main_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (tmp_path / "error.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield port, upstream
    finally:
        upstream.release.set()
        proc.terminate()
        proc.wait(10)
        server.shutdown()
        server.server_close()


def streams_first_event(
    port: int, upstream: Upstream, method: str, path: str, headers: dict[str, str] | None = None
) -> bool:
    """Whether the first event reaches the client while the upstream holds the stream open."""
    upstream.release.clear()
    body = b'{"stream": true}' if method == "POST" else b""
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: inferq.test",
        "Connection: close",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(request)
        try:
            while b"id: 1-0" not in data and (chunk := sock.recv(65536)):
                data += chunk
        except TimeoutError:
            pass
        streamed = b"id: 1-0" in data
        upstream.release.set()
        sock.settimeout(10)
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert b"event: done" in data
    return streamed


@pytest.mark.parametrize("framing", ["chunked", "until-close"])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/0190b7e2/events"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
    ],
)
def test_nginx_streams_sse_events_as_they_come(
    proxied: tuple[int, Upstream], method: str, path: str, framing: str
) -> None:
    port, upstream = proxied
    assert streams_first_event(port, upstream, method, f"{path}?framing={framing}")


def test_nginx_passes_last_event_id_on_a_keepalive_upstream(
    proxied: tuple[int, Upstream],
) -> None:
    port, upstream = proxied
    path = "/v1/jobs/0190b7e2/events"
    assert streams_first_event(port, upstream, "GET", path, {"Last-Event-ID": "1-0"})
    seen_path, headers = upstream.requests[-1]
    assert seen_path == path
    assert headers["last-event-id"] == "1-0"
    assert headers.get("connection", "") != "close"
    assert headers["x-forwarded-for"] == "127.0.0.1"


def test_nginx_elsewhere_buffers_unless_api_sends_x_accel_buffering_no(
    proxied: tuple[int, Upstream],
) -> None:
    port, upstream = proxied
    assert streams_first_event(port, upstream, "GET", "/v1/stream?accel=no")
    # Control: the harness does see buffering where it is on.
    assert not streams_first_event(port, upstream, "GET", "/v1/stream")


def test_nginx_rejects_oversized_bodies_and_hides_metrics(proxied: tuple[int, Upstream]) -> None:
    port, upstream = proxied
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 404
    conn.request(
        "POST",
        "/v1/jobs",
        body=b"x" * (5 * 1024 * 1024),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()
    assert not upstream.requests


# ---------------------------------------------------------------- Kubernetes


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in k8s_files() for doc in load_yaml_docs(path)]


def k8s_get(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def workloads() -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d["kind"] in {"Deployment", "Job"}]


def k8s_models() -> dict[str, dict[str, Any]]:
    return models_file(k8s_get("ConfigMap", "inferq-models")["data"]["models.toml"])


def test_k8s_documents_have_the_required_fields() -> None:
    for doc in k8s_docs():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        assert doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "inferq", doc["metadata"]["name"]
        assert {"spec", "data", "stringData"} & set(doc) or doc["kind"] == "Namespace"


def test_k8s_has_every_component() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs()}
    for expected in [
        ("Namespace", "inferq"),
        ("ConfigMap", "inferq-config"),
        ("ConfigMap", "inferq-models"),
        ("Secret", "inferq-secrets"),
        ("Deployment", "inferq-api"),
        ("Service", "inferq-api"),
        ("HorizontalPodAutoscaler", "inferq-api"),
        ("PodDisruptionBudget", "inferq-api"),
        ("Deployment", "inferq-worker"),
        ("Deployment", "inferq-beat"),
        ("Deployment", "inferq-flower"),
        ("Service", "inferq-flower"),
        ("Job", "inferq-migrate"),
        ("Ingress", "inferq"),
        ("ServiceMonitor", "inferq-api"),
    ]:
        assert expected in kinds, expected


def test_k8s_inferq_containers_run_exactly_the_cli_commands() -> None:
    commands = {}
    for doc in workloads():
        for c in all_containers(pod_spec(doc)):
            if c["image"].split("/")[-1].split(":")[0] == "inferq":
                assert "args" not in c, c["name"]
                assert is_cli_command(c["command"]), f"{doc['metadata']['name']}: {c['command']}"
                commands[doc["metadata"]["name"]] = c["command"][1]
    assert commands == {
        "inferq-api": "api",
        "inferq-worker": "worker",
        "inferq-beat": "beat",
        "inferq-flower": "flower",
        "inferq-migrate": "migrate",
    }


def test_k8s_api_probes_readyz_and_healthz() -> None:
    api = k8s_get("Deployment", "inferq-api")
    (container,) = pod_spec(api)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(option(container["command"], "--port"))
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["spec"]["replicas"] >= 2


def test_k8s_worker_gets_a_gpu_and_a_tgi_sidecar_for_its_models() -> None:
    spec = pod_spec(k8s_get("Deployment", "inferq-worker"))
    (tgi,) = [c for c in all_containers(spec) if "text-generation-inference" in c["image"]]
    assert tgi in spec.get("initContainers", []) and tgi["restartPolicy"] == "Always"
    resources = tgi["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    tgi_port = int(option(tgi["args"], "--port"))
    assert tgi["startupProbe"]["httpGet"]["path"] == "/health"
    (worker,) = spec["containers"]
    models = k8s_models()
    for name in option(worker["command"], "--models").split(","):
        assert models[name]["url"] == f"http://127.0.0.1:{tgi_port}"


def test_k8s_beat_never_runs_twice() -> None:
    beat = k8s_get("Deployment", "inferq-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"


def test_k8s_references_resolve() -> None:
    docs = k8s_docs()
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    pod_labels = [pod_spec_labels(d) for d in workloads()]
    for doc in workloads():
        spec = pod_spec(doc)
        if doc["kind"] == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= pod_spec_labels(doc).items()
        for c in all_containers(spec):
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef") or src.get("secretRef")
                kind = "ConfigMap" if "configMapRef" in src else "Secret"
                assert (kind, ref["name"]) in names, ref
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                assert ("ConfigMap", vol["configMap"]["name"]) in names
    for doc in docs:
        if doc["kind"] == "Service":
            assert any(doc["spec"]["selector"].items() <= labels.items() for labels in pod_labels)
        if doc["kind"] == "PodDisruptionBudget":
            labels = pod_spec_labels(k8s_get("Deployment", "inferq-api"))
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if doc["kind"] == "HorizontalPodAutoscaler":
            ref = doc["spec"]["scaleTargetRef"]
            assert (ref["kind"], ref["name"]) in names


def pod_spec_labels(doc: dict[str, Any]) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"]["labels"]


def test_k8s_ingress_streams_sse_to_the_api() -> None:
    ingress = k8s_get("Ingress", "inferq")
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off"
    assert int(notes[prefix + "proxy-read-timeout"]) >= 3600
    service = k8s_get("Service", "inferq-api")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert "/v1" in {p["path"] for p in paths}
    for p in paths:
        backend = p["backend"]["service"]
        assert backend["name"] == "inferq-api" and backend["port"]["name"] in port_names


def test_k8s_models_file_is_complete() -> None:
    for name, model in k8s_models().items():
        assert model["backend"] in {"tgi", "openai"}, name
        assert {
            "url",
            "max_tokens",
            "context_tokens",
            "price_input_per_mtok",
            "price_output_per_mtok",
        } <= set(model), name


def test_k8s_kustomization_lists_all_but_optional_manifests() -> None:
    kustomization = load_yaml_docs(K8S / "kustomization.yaml")[0]
    # Each needs CRDs a cluster may not have (KEDA, the Prometheus Operator), or real secrets.
    optional = {"secret.example.yaml", "servicemonitor.yaml", "scaledobject.yaml"}
    assert set(kustomization["resources"]) == {p.name for p in k8s_files()} - optional


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip("kubernetes-validate is not installed")
    import kubernetes_validate

    versions = [K8S_MIN_VERSION, kubernetes_validate.latest_version()]
    checked = set()
    for doc in k8s_docs():
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                # Custom resources: KEDA's are checked by test_k8s_keda_objects_match_keda_crds.
                assert doc["apiVersion"].startswith(("monitoring.coreos.com/", "keda.sh/"))
                continue
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({version}): {exc}")
            checked.add(doc["kind"])
    assert {"Deployment", "Job", "Ingress", "HorizontalPodAutoscaler"} <= checked


def test_k8s_kustomization_builds() -> None:
    kubectl = require_tool("kubectl")
    proc = run([kubectl, "kustomize", str(K8S)])
    if proc.returncode != 0 and "unknown command" in proc.stderr:
        pytest.skip("kubectl has no kustomize")
    assert_ok(proc)
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert len(built) == sum(
        len(load_yaml_docs(K8S / r))
        for r in load_yaml_docs(K8S / "kustomization.yaml")[0]["resources"]
    )
    assert all(d["metadata"].get("namespace", "inferq") == "inferq" for d in built)


# ---------------------------------------------------------------- KEDA

# kubernetes-validate knows no custom resources. These schemas are KEDA's CRD fields
# (keda.sh_scaledobjects.yaml and keda.sh_triggerauthentications.yaml, KEDA 2.12+) for the
# parts of the objects this deployment writes, with the metadata each scaler it uses reads
# (KEDA's redis and postgresql scaler documentation). As with `kubectl apply` and the API
# server's strict field validation, a field they do not know is an error, not ignored.
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_NUMBER_TEXT = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}
_OBJECT_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_HPA_RULES = {
    "type": "object",
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}
_REDIS_METADATA = {
    "type": "object",
    "properties": {
        **{
            name: {"type": "string"}
            for name in (
                "address",
                "addressFromEnv",
                "host",
                "hostFromEnv",
                "port",
                "portFromEnv",
                "usernameFromEnv",
                "passwordFromEnv",
                "listName",
                "keyName",
                "enableTLS",
                "unsafeSsl",
            )
        },
        "listLength": _NUMBER_TEXT,
        "activationListLength": _NUMBER_TEXT,
        "keyValue": _NUMBER_TEXT,
        "activationValue": _NUMBER_TEXT,
        "databaseIndex": {"type": "string", "pattern": r"^[0-9]+$"},
    },
    "oneOf": [{"required": ["listName"]}, {"required": ["keyName"]}],
    "additionalProperties": False,
}
_POSTGRESQL_METADATA = {
    "type": "object",
    "required": ["query", "targetQueryValue"],
    "properties": {
        **{
            name: {"type": "string"}
            for name in (
                "connectionFromEnv",
                "host",
                "port",
                "userName",
                "passwordFromEnv",
                "dbName",
                "sslmode",
                "query",
            )
        },
        "targetQueryValue": _NUMBER_TEXT,
        "activationTargetQueryValue": _NUMBER_TEXT,
    },
    "additionalProperties": False,
}
_TRIGGER = {
    "type": "object",
    "required": ["type", "metadata"],
    "properties": {
        "type": {"enum": ["redis", "postgresql"]},
        "name": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "authenticationRef": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
            },
            "additionalProperties": False,
        },
        "metricType": {"enum": ["AverageValue", "Value"]},
        "useCachedMetrics": {"type": "boolean"},
    },
    "allOf": [
        {
            "if": {"properties": {"type": {"const": "redis"}}},
            "then": {"properties": {"metadata": _REDIS_METADATA}},
        },
        {
            "if": {"properties": {"type": {"const": "postgresql"}}},
            "then": {"properties": {"metadata": _POSTGRESQL_METADATA}},
        },
    ],
    "additionalProperties": False,
}
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "ScaledObject"},
            "metadata": _OBJECT_META,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": {"type": "string", "minLength": 1},
                            "envSourceContainerName": {"type": "string"},
                        },
                        "additionalProperties": False,
                    },
                    "pollingInterval": _INT32,
                    "cooldownPeriod": _INT32,
                    "initialCooldownPeriod": _INT32,
                    "idleReplicaCount": _INT32,
                    "minReplicaCount": _INT32,
                    "maxReplicaCount": _INT32,
                    "fallback": {
                        "type": "object",
                        "required": ["failureThreshold", "replicas"],
                        "properties": {"failureThreshold": _INT32, "replicas": _INT32},
                        "additionalProperties": False,
                    },
                    "advanced": {
                        "type": "object",
                        "properties": {
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "properties": {
                                    "name": {"type": "string"},
                                    "behavior": {
                                        "type": "object",
                                        "properties": {
                                            "scaleUp": _HPA_RULES,
                                            "scaleDown": _HPA_RULES,
                                        },
                                        "additionalProperties": False,
                                    },
                                },
                                "additionalProperties": False,
                            },
                            # KEDA requires formula and target together.
                            "scalingModifiers": {
                                "type": "object",
                                "required": ["formula", "target"],
                                "properties": {
                                    "formula": {"type": "string", "minLength": 1},
                                    "target": _NUMBER_TEXT,
                                    "activationTarget": _NUMBER_TEXT,
                                    "metricType": {"enum": ["AverageValue", "Value"]},
                                },
                                "additionalProperties": False,
                            },
                        },
                        "additionalProperties": False,
                    },
                    "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "TriggerAuthentication"},
            "metadata": _OBJECT_META,
            "spec": {
                "type": "object",
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                            "properties": {
                                "parameter": {"type": "string"},
                                "name": {"type": "string"},
                                "key": {"type": "string"},
                            },
                            "additionalProperties": False,
                        },
                    },
                    "env": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name"],
                            "properties": {
                                "parameter": {"type": "string"},
                                "name": {"type": "string"},
                                "containerName": {"type": "string"},
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


def keda_docs() -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d["apiVersion"].startswith("keda.sh/")]


def keda_errors(doc: dict[str, Any]) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(KEDA_SCHEMAS[doc["kind"]])
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_k8s_keda_objects_match_keda_crds() -> None:
    docs = keda_docs()
    assert {d["kind"] for d in docs} == {"ScaledObject", "TriggerAuthentication"}
    for doc in docs:
        assert not keda_errors(doc), (doc["kind"], keda_errors(doc))
    # The schemas do refuse what KEDA would: a misspelt scaler field, formula without target.
    scaled = k8s_get("ScaledObject", "inferq-worker")
    misspelt = json.loads(json.dumps(scaled))
    misspelt["spec"]["triggers"][0]["metadata"]["listname"] = "x"
    assert keda_errors(misspelt)
    untargeted = json.loads(json.dumps(scaled))
    del untargeted["spec"]["advanced"]["scalingModifiers"]["target"]
    assert keda_errors(untargeted)


def example_secret() -> dict[str, str]:
    (secret,) = load_yaml_docs(K8S / "secret.example.yaml")
    return dict(secret["stringData"])


def test_k8s_workers_scale_on_every_priority_list_and_running_jobs() -> None:
    from urllib.parse import urlsplit

    from inferq.models import Job, JobStatus
    from inferq.queue import priority_lists
    from inferq.registry import queue_name

    scaled = k8s_get("ScaledObject", "inferq-worker")
    spec = scaled["spec"]
    ref = spec["scaleTargetRef"]
    worker = k8s_get(ref["kind"], ref["name"])
    (container,) = [
        c for c in pod_spec(worker)["containers"] if c["name"] == ref["envSourceContainerName"]
    ]
    (model,) = option(container["command"], "--models").split(",")
    concurrency = option(container["command"], "--concurrency")
    modifiers = spec["advanced"]["scalingModifiers"]
    assert modifiers["target"] == concurrency and modifiers["metricType"] == "AverageValue"
    # Every list of the model's queue, as the workers' own code names them (the database's
    # name is the queue prefix), each read once, summed with the running jobs.
    secret = example_secret()
    prefix = urlsplit(secret["INFERQ_DATABASE_URL"]).path.strip("/")
    redis = [t for t in spec["triggers"] if t["type"] == "redis"]
    assert [t["metadata"]["listName"] for t in redis] == priority_lists(queue_name(prefix, model))
    broker = secret.get("INFERQ_BROKER_URL") or secret["INFERQ_REDIS_URL"]
    redis_db = urlsplit(broker).path.strip("/") or "0"
    assert {t["metadata"]["databaseIndex"] for t in redis} == {redis_db}
    assert {t["metadata"]["listLength"] for t in redis} == {concurrency}
    (running,) = [t for t in spec["triggers"] if t["type"] == "postgresql"]
    table = Job.__table__
    assert {"status", "model"} <= set(table.c.keys())
    assert running["metadata"]["query"] == (
        f"SELECT count(*) FROM {table.name} "
        f"WHERE status = '{JobStatus.running.value}' AND model = '{model}'"
    )
    assert running["metadata"]["targetQueryValue"] == concurrency
    names = [t["name"] for t in spec["triggers"]]
    terms = [term.strip() for term in modifiers["formula"].split("+")]
    assert sorted(terms) == sorted(names) and len(set(names)) == len(names)
    # What the triggers read from resolves: the worker's environment and the Secret's keys.
    sources = [s.get("secretRef", {}).get("name") for s in container["envFrom"]]
    assert running["metadata"]["connectionFromEnv"] in secret and "inferq-secrets" in sources
    for trigger in redis:
        auth = k8s_get("TriggerAuthentication", trigger["authenticationRef"]["name"])
        params = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
        assert set(params) == {"address", "password"}
        assert {r["name"] for r in params.values()} == {"inferq-secrets"}
    # KEDA owns the worker's HPA: no other autoscaler may target the Deployment.
    hpas = [d for d in k8s_docs() if d["kind"] == "HorizontalPodAutoscaler"]
    assert all(h["spec"]["scaleTargetRef"]["name"] != ref["name"] for h in hpas)


# ---------------------------------------------------------------- the CLI itself


def deployed_commands() -> list[list[str]]:
    entry = image_entrypoint()
    commands = [entry + svc["command"] for svc in inferq_services().values()]
    for doc in workloads():
        commands += [
            c["command"]
            for c in all_containers(pod_spec(doc))
            if c["image"].split("/")[-1].split(":")[0] == "inferq"
        ]
    return commands


def test_deployed_commands_parse_with_the_inferq_cli() -> None:
    cli = pytest.importorskip("inferq.cli")
    for argv in deployed_commands():
        parent = cli.main.make_context("inferq", [argv[1]], resilient_parsing=True)
        command = cli.main.get_command(parent, argv[1])
        assert command is not None, argv
        # Parses the options exactly as the process would, without starting it.
        command.make_context(argv[1], argv[2:], parent=parent)


# ---------------------------------------------------------------- Prometheus


def prometheus_config() -> dict[str, Any]:
    return load_yaml_docs(PROMETHEUS / "prometheus.yml")[0]


def rules() -> list[dict[str, Any]]:
    groups = load_yaml_docs(PROMETHEUS / "rules.yml")[0]["groups"]
    return [rule for group in groups for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """Series names used by a PromQL expression (label values and keywords excluded)."""
    text = re.sub(r'"[^"]*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b\d[\w.]*", " ", text)
    tokens = set(re.findall(r"[A-Za-z_:][\w:]*", text))
    functions = set(re.findall(r"([A-Za-z_]\w*)\s*\(", text))
    keywords = {"and", "or", "unless", "bool", "offset"}
    return tokens - functions - keywords


def test_prometheus_scrapes_api_workers_flower_and_tgi() -> None:
    config = prometheus_config()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"inferq-api", "inferq-worker", "flower", "tgi"} <= set(jobs)
    api = jobs["inferq-api"]["dns_sd_configs"][0]
    assert api["names"] == ["api"] and api["port"] == 8000
    assert jobs["flower"]["static_configs"][0]["targets"] == ["flower:5555"]
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())
    assert config["rule_files"] == ["rules.yml"]
    mounts = compose_services()["prometheus"]["volumes"]
    assert "./deploy/prometheus/rules.yml:/etc/prometheus/rules.yml:ro" in mounts


def test_rules_use_only_known_metric_names() -> None:
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        unknown = metric_names(rule["expr"]) - METRICS - recorded
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: {unknown}"


def expanded(expr: str) -> str:
    recorded = {r["record"]: r["expr"] for r in rules() if "record" in r}
    return expr + " ".join(recorded[n] for n in metric_names(expr) if n in recorded)


def test_rules_alert_on_errors_latency_queues_and_workers() -> None:
    alerts = {r["alert"]: expanded(r["expr"]) for r in rules() if "alert" in r}
    assert 'status=~"failed' in alerts["InferqHighErrorRate"]
    assert "histogram_quantile(0.99" in alerts["InferqTTFTP99High"]
    assert "inferq_ttft_seconds_bucket" in alerts["InferqTTFTP99High"]
    assert "deriv(inferq_queue_depth" in alerts["InferqQueueDepthGrowing"]
    assert "flower_worker_online" in alerts["InferqNoWorkers"]
    assert "absent(inferq_sweeper_last_run_timestamp_seconds)" in alerts["InferqSweeperStalled"]
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert {"summary", "description"} <= set(rule["annotations"])


def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool = require_tool("promtool")
    assert_ok(run([promtool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS))
    assert_ok(run([promtool, "check", "rules", "rules.yml"], cwd=PROMETHEUS))


def test_alerts_fire_in_promtool_unit_tests() -> None:
    promtool = require_tool("promtool")
    assert_ok(run([promtool, "test", "rules", "rules.test.yml"], cwd=PROMETHEUS))


# ---------------------------------------------------------------- Grafana


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def as_promql(expr: str) -> str:
    """A Grafana query with its variables replaced by values PromQL accepts."""
    return expr.replace("$__rate_interval", "5m").replace("$model", ".*")


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    (source,) = load_yaml_docs(prov / "datasources" / "prometheus.yml")[0]["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = load_yaml_docs(prov / "dashboards" / "inferq.yml")[0]["providers"]
    mounts = compose_services()["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts


def test_grafana_dashboard_panels_are_well_formed() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"panel {panel['title']} overlaps another"
        cells |= mine


def test_grafana_dashboard_uses_only_known_metric_names() -> None:
    for expr in dashboard_exprs():
        unknown = metric_names(as_promql(expr)) - METRICS
        assert not unknown, f"{expr}: {unknown}"


def test_grafana_dashboard_covers_the_platform() -> None:
    exprs = "\n".join(dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (model, le) (rate(inferq_ttft_seconds" in exprs
    for needle in (
        "rate(inferq_output_tokens_total",
        "inferq_queue_depth",
        "sum by (status) (rate(inferq_jobs_finished_total",
        'status=~"failed|expired"',
        "increase(inferq_cost_usd_total{",
        "[1d]",
        "inferq_sse_connections",
        "inferq_backend_errors_total",
    ):
        assert needle in exprs, needle


def test_grafana_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    group = {
        "name": "dashboard",
        "rules": [
            {"record": f"dashboard:query_{i}:expr", "expr": as_promql(expr)}
            for i, expr in enumerate(dashboard_exprs())
        ],
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    assert_ok(run([promtool, "check", "rules", str(path)]))


# ---------------------------------------------------------------- Grafana: usage from Postgres

USAGE_DASHBOARD = DEPLOY / "grafana" / "dashboards" / "inferq-usage.json"
READER_SQL = DEPLOY / "grafana" / "sql" / "reader.sql"
# Columns that hold what people wrote or were answered: the reader never gets them.
TEXT_COLUMNS = ("input", "output", "comment", "rationale", "error_message", "metadata", "params")


def usage_queries() -> list[str]:
    dash = json.loads(USAGE_DASHBOARD.read_text())
    return [t["rawSql"] for p in dash["panels"] for t in p["targets"]]


def test_grafana_postgres_source_reads_as_the_reader_role() -> None:
    path = DEPLOY / "grafana" / "provisioning" / "datasources" / "postgres.yml"
    (source,) = load_yaml_docs(path)[0]["datasources"]
    assert source["type"] == "grafana-postgresql-datasource"
    assert source["user"] == "grafana_reader" and source["jsonData"]["database"] == "inferq"
    assert source["secureJsonData"]["password"] == "${GRAFANA_DB_PASSWORD}"
    from inferq.grafana import READER_COLUMNS, READER_ROLE

    sql = READER_SQL.read_text()
    assert "\\set role grafana_reader" in sql and "default_transaction_read_only = on" in sql
    assert READER_ROLE == "grafana_reader"
    grants = " ".join(re.findall(r"GRANT SELECT \(([^)]*)\)", sql))
    granted = {c.strip().strip('"') for c in grants.split(",")}
    assert not granted & set(TEXT_COLUMNS), granted & set(TEXT_COLUMNS)
    assert not {c for cs in READER_COLUMNS.values() for c in cs} & set(TEXT_COLUMNS)


def test_grafana_usage_dashboard_is_well_formed() -> None:
    dash = json.loads(USAGE_DASHBOARD.read_text())
    assert dash["uid"] == "inferq-usage" and dash["uid"] != dashboard()["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in dash["panels"]}
    assert "Cost per user per day (top 20 users)" in titles
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "inferq-postgres"
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "inferq-postgres" and target["rawQuery"]
            assert "$__timeFilter(" in target["rawSql"]
    # Per-user cost leaves the judge's jobs out (they belong to no tenant's users).
    assert all("judge_of IS NULL" in q for q in usage_queries() if "cost_usd" in q)


def _as_sql(query: str) -> str:
    """A Grafana Postgres query with its macros expanded as Grafana does (last 14 days)."""
    query = re.sub(
        r"\$__timeGroupAlias\(([^,]+), '1d'\)",
        r'floor(extract(epoch from \1) / 86400) * 86400 AS "time"',
        query,
    )
    return re.sub(
        r"\$__timeFilter\(([^)]+)\)",
        r"\1 BETWEEN now() - interval '14 days' AND now()",
        query,
    )


def test_grafana_usage_queries_run_as_the_reader_role() -> None:
    admin_url = os.environ.get("INFERQ_TEST_DATABASE_URL")
    if not admin_url:
        pytest.skip("needs a Postgres server (INFERQ_TEST_DATABASE_URL)")
    import psycopg

    from inferq.grafana import ensure_reader
    from inferq.migrate import upgrade
    from tests.servers import create_database, drop_database

    url, name = create_database(admin_url)
    role = f"grafana_reader_{name[-10:]}"
    try:
        upgrade(url)
        ensure_reader(url, "test", role)  # what `inferq migrate` makes
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(f"SET ROLE {role}")  # type: ignore[arg-type]
            for query in usage_queries():
                db.execute(_as_sql(query)).fetchall()  # type: ignore[arg-type]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                db.execute("SELECT input FROM jobs")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                db.execute("SELECT comment FROM feedback")
    finally:
        drop_database(admin_url, name)
        with psycopg.connect(admin_url, autocommit=True) as db:
            db.execute(f"DROP ROLE IF EXISTS {role}")  # type: ignore[arg-type]


def test_grafana_dashboard_shows_feedback_and_judge_scores() -> None:
    exprs = "\n".join(dashboard_exprs())
    for needle in (
        "increase(inferq_feedback_total{",
        "inferq_judge_score_sum",
        "inferq_judge_verdicts_total",
    ):
        assert needle in exprs, needle


# ---------------------------------------------------------------- Grafana's reader role


def test_compose_gives_the_reader_password_to_migrate_and_grafana_only() -> None:
    services = compose_services()
    migrate, grafana = services["migrate"], services["grafana"]
    assert migrate["command"] == ["migrate"]
    uses = {
        name: svc["environment"][var]
        for name, svc in services.items()
        for var in svc.get("environment") or {}
        if "GRAFANA_DB_PASSWORD" in var
    }
    assert uses.keys() == {"migrate", "grafana"}, uses
    assert uses["migrate"] == uses["grafana"]
    assert migrate["environment"]["INFERQ_GRAFANA_DB_PASSWORD"].startswith(
        "${GRAFANA_DB_PASSWORD:?"
    )
    assert "GRAFANA_DB_PASSWORD" in grafana["environment"]
    # migrate keeps every setting the other inferq services have.
    assert services["api"]["environment"].items() <= migrate["environment"].items()
    # The data source reaches compose's Postgres and database.
    path = DEPLOY / "grafana" / "provisioning" / "datasources" / "postgres.yml"
    (source,) = load_yaml_docs(path)[0]["datasources"]
    host = source["url"].split(":")[0]
    assert host in services and host in grafana["depends_on"]
    assert source["jsonData"]["database"] == services[host]["environment"]["POSTGRES_DB"]


def test_compose_config_renders_one_reader_password(tmp_path: Path) -> None:
    env = generated_env(tmp_path / ".env")
    proc = compose_config(env)
    assert_ok(proc)
    rendered = yaml.safe_load(proc.stdout)["services"]
    password = env_file(env)["GRAFANA_DB_PASSWORD"]
    migrate = rendered["migrate"]["environment"]
    assert migrate["INFERQ_GRAFANA_DB_PASSWORD"] == password
    assert rendered["grafana"]["environment"]["GRAFANA_DB_PASSWORD"] == password
    assert migrate["INFERQ_DATABASE_URL"] == rendered["api"]["environment"]["INFERQ_DATABASE_URL"]


def test_k8s_migrate_job_reads_the_reader_password_from_the_secret() -> None:
    secret = example_secret()
    assert "INFERQ_GRAFANA_DB_PASSWORD" in secret
    (container,) = pod_spec(k8s_get("Job", "inferq-migrate"))["containers"]
    assert {"secretRef": {"name": "inferq-secrets"}} in container["envFrom"]
    assert container["command"] == ["inferq", "migrate"]


def scram_matches(verifier: str, password: str) -> bool:
    """Whether a Postgres SCRAM-SHA-256 verifier (RFC 5803) is that of `password`."""
    import base64
    import hashlib
    import hmac

    method, params, keys = verifier.split("$")
    iterations, salt = params.split(":")
    stored = keys.split(":")[0]
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return method == "SCRAM-SHA-256" and hashlib.sha256(client_key).digest() == base64.b64decode(
        stored
    )


@dataclass
class ReaderRole:
    verifier: str
    settings: set[str]
    columns: set[tuple[str, str, str]]  # (table, column, privilege)
    may_connect: bool


def reader_role(admin_url: str, database: str, role: str) -> ReaderRole:
    import psycopg

    with psycopg.connect(admin_url.replace("postgresql+psycopg", "postgresql")) as db:
        verifier, settings = db.execute(
            "SELECT a.rolpassword, r.rolconfig FROM pg_authid a JOIN pg_roles r USING (oid)"
            " WHERE a.rolname = %s",
            (role,),
        ).fetchone()  # type: ignore[misc]
        may_connect = db.execute(
            "SELECT has_database_privilege(%s, %s, 'CONNECT')", (role, database)
        ).fetchone()[0]  # type: ignore[index]
    with psycopg.connect(database_url_of(admin_url, database)) as db:
        columns = db.execute(
            "SELECT table_name, column_name, privilege_type FROM information_schema"
            ".column_privileges WHERE grantee = %s",
            (role,),
        ).fetchall()
    return ReaderRole(verifier, set(settings), set(columns), may_connect)


def database_url_of(admin_url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(admin_url).set(drivername="postgresql", database=database)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def fresh_database() -> Iterator[tuple[str, str]]:
    """A migrated database of its own: (admin URL, its name)."""
    admin_url = os.environ.get("INFERQ_TEST_DATABASE_URL")
    if not admin_url:
        pytest.skip("needs a Postgres server (INFERQ_TEST_DATABASE_URL)")
    from inferq.migrate import upgrade
    from tests.servers import create_database, drop_database

    url, name = create_database(admin_url)
    try:
        upgrade(url)
        yield admin_url, name
    finally:
        drop_database(admin_url, name)


def drop_role(admin_url: str, role: str) -> None:
    import psycopg

    with psycopg.connect(database_url_of(admin_url, "postgres"), autocommit=True) as db:
        db.execute(f'DROP ROLE IF EXISTS "{role}"')  # type: ignore[arg-type]


def migrate(admin_url: str, database: str, tmp: Path, **extra: str) -> str:
    """`inferq migrate`, as the compose service runs it (production), on `database`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env |= {
        "INFERQ_ENVIRONMENT": "production",
        "INFERQ_DATABASE_URL": database_url_of(admin_url, database),
        "INFERQ_FLOWER_BASIC_AUTH": "ops:Tq8vL2mZ0xYc4nR7",
        "INFERQ_DATA_DIR": str(tmp),
        **extra,
    }
    command = compose_services()["migrate"]["command"]
    proc = run([sys.executable, "-m", "inferq", *command], env=env, cwd=tmp)
    assert_ok(proc)
    return proc.stdout


def test_migrate_makes_and_updates_the_reader_role(
    fresh_database: tuple[str, str], tmp_path: Path
) -> None:
    from inferq.grafana import READER_COLUMNS, READER_ROLE

    admin_url, name = fresh_database
    import psycopg

    role = READER_ROLE  # the role compose's Grafana logs in as: one per Postgres server
    with psycopg.connect(database_url_of(admin_url, "postgres")) as db:
        existed = db.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    first, second = "a'b\"c$d\\e" + "x" * 24, "rotated-" + "y" * 32
    try:
        out = migrate(admin_url, name, tmp_path, INFERQ_GRAFANA_DB_PASSWORD=first)
        assert f"role {role} {'updated' if existed else 'created'}" in out
        made = reader_role(admin_url, name, role)
        assert scram_matches(made.verifier, first)  # sent as a verifier, quoting and all
        assert made.settings == {"default_transaction_read_only=on", "statement_timeout=30s"}
        expected = {(t, c, "SELECT") for t, cs in READER_COLUMNS.items() for c in cs}
        assert made.columns == expected and made.may_connect
        # Every run brings it up to date: a new password replaces the old one.
        assert f"role {role} updated" in migrate(
            admin_url, name, tmp_path, INFERQ_GRAFANA_DB_PASSWORD=second
        )
        rotated = reader_role(admin_url, name, role)
        assert scram_matches(rotated.verifier, second)
        assert not scram_matches(rotated.verifier, first)
        assert rotated.columns == expected
        # Without the variable migrate leaves the role alone.
        assert "grafana" not in migrate(admin_url, name, tmp_path)
        assert reader_role(admin_url, name, role).verifier == rotated.verifier
    finally:
        if not existed:
            from tests.servers import drop_database

            drop_database(admin_url, name)  # its CONNECT grant first
            drop_role(admin_url, role)


def test_migrate_refuses_a_default_reader_password(
    fresh_database: tuple[str, str], tmp_path: Path
) -> None:
    admin_url, name = fresh_database
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env |= {
        "INFERQ_ENVIRONMENT": "production",
        "INFERQ_DATABASE_URL": database_url_of(admin_url, name),
        "INFERQ_FLOWER_BASIC_AUTH": "ops:Tq8vL2mZ0xYc4nR7",
        "INFERQ_DATA_DIR": str(tmp_path),
        "INFERQ_GRAFANA_DB_PASSWORD": "change-me",
    }
    proc = run([sys.executable, "-m", "inferq", "migrate"], env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert "INFERQ_GRAFANA_DB_PASSWORD" in proc.stderr and "change-me" not in proc.stderr


def test_reader_sql_by_hand_grants_what_migrate_grants(
    fresh_database: tuple[str, str], tmp_path: Path
) -> None:
    psql = require_tool("psql")
    from inferq.grafana import ensure_reader

    admin_url, name = fresh_database
    url = database_url_of(admin_url, name)
    by_migrate, by_hand = f"reader_py_{name[-10:]}", f"reader_sql_{name[-10:]}"
    password = 'it\'s "quoted"; DROP TABLE jobs; --'
    try:
        ensure_reader(url, password, by_migrate)
        variables = ["ON_ERROR_STOP=1", f"role={by_hand}", f"password={password}"]
        command = [psql, url, "-X", "-q", "-f", str(READER_SQL)]
        for _ in range(2):  # made, then updated
            assert_ok(run([*command, *(a for v in variables for a in ("-v", v))]))
        py, sql = reader_role(admin_url, name, by_migrate), reader_role(admin_url, name, by_hand)
        assert scram_matches(py.verifier, password) and scram_matches(sql.verifier, password)
        assert py.settings == sql.settings and py.may_connect and sql.may_connect
        assert py.columns == sql.columns and py.columns
    finally:
        from tests.servers import drop_database

        drop_database(admin_url, name)
        drop_role(admin_url, by_migrate)
        drop_role(admin_url, by_hand)


# ---------------------------------------------------------------- beat's metrics


def test_compose_beat_serves_metrics_where_prometheus_scrapes() -> None:
    services = compose_services()
    beat = services["beat"]
    port = int(beat["environment"]["INFERQ_BEAT_METRICS_PORT"])
    assert port != int(beat["environment"]["INFERQ_WORKER_METRICS_PORT"])
    assert [int(p) for p in beat["expose"]] == [port]
    assert "beat_metrics_port" in Settings.model_fields
    jobs = {job["job_name"]: job for job in prometheus_config()["scrape_configs"]}
    (target,) = jobs["inferq-beat"]["dns_sd_configs"]
    assert target["names"] == ["beat"] and target["port"] == port


def test_k8s_beat_serves_metrics_to_its_pod_monitor() -> None:
    beat = k8s_get("Deployment", "inferq-beat")
    (container,) = pod_spec(beat)["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(env["INFERQ_BEAT_METRICS_PORT"])
    monitor = k8s_get("PodMonitor", "inferq-beat")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_spec_labels(beat).items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_target_down_covers_every_inferq_process() -> None:
    (down,) = [r for r in rules() if r.get("alert") == "InferqTargetDown"]
    watched = re.search(r'job=~"([^"]+)"', down["expr"]).group(1)  # type: ignore[union-attr]
    jobs = {job["job_name"] for job in prometheus_config()["scrape_configs"]}
    for job in ("inferq-api", "inferq-worker", "inferq-beat"):
        assert job in jobs and re.fullmatch(watched, job), job
