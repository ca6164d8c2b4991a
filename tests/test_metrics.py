"""Every metric the platform promises, read from the processes' /metrics after real work.

A deployment of its own (its own database, so its own queues, sweeper and webhook
dispatcher on the session's Redis and simulators): an API, a worker and beat, each with its
metrics port. After a job, a cache miss and hit, a refused submit, a failing backend, a
webhook delivery and an open event stream, each process's /metrics carries what that
process counts: the API (submits, cache, limits, queue depth, SSE connections, the
sweeper's last run), the worker (jobs finished, latencies, tokens, cost, backend errors
and retries), beat (webhook deliveries). Run a second time with PROMETHEUS_MULTIPROC_DIR,
as `inferq up` runs them on one host: there the API's /metrics alone carries everything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from httpx_sse import connect_sse
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from inferq.metrics import LATENCY_BUCKETS, observe_times
from inferq.migrate import upgrade
from inferq.processes import Child
from inferq.registry import queue_name
from tests.conftest import BOOTSTRAP_KEY, Platform, submit, wait_for
from tests.servers import Databases, create_database, drop_database, free_port, wait_http

MODELS = """
[models.sim]
backend = "tgi"
url = "{fast}"
max_tokens = 64
price_input_per_mtok = 0.25
price_output_per_mtok = 1.25

[models.down]
backend = "tgi"
url = "http://127.0.0.1:{closed}"
max_tokens = 16

[models.idle]
backend = "tgi"
url = "{fast}"
max_tokens = 16
"""

API = "api"
WORKER = "worker"
BEAT = "beat"

# Every metric the platform promises, with the process that counts it and the labels it must
# carry after this module's work. (name of the sample, its labels) → the process.
EXPECTED: list[tuple[str, dict[str, str], str]] = [
    ("inferq_jobs_submitted_total", {"model": "sim"}, API),
    ("inferq_jobs_finished_total", {"model": "sim", "status": "succeeded"}, WORKER),
    ("inferq_jobs_finished_total", {"model": "down", "status": "failed"}, WORKER),
    ("inferq_queue_wait_seconds_count", {"model": "sim"}, WORKER),
    ("inferq_ttft_seconds_count", {"model": "sim"}, WORKER),
    # The time between one token and the next.
    ("inferq_inter_token_seconds_count", {"model": "sim"}, WORKER),
    ("inferq_job_duration_seconds_count", {"model": "sim"}, WORKER),
    ("inferq_input_tokens_total", {"model": "sim"}, WORKER),
    ("inferq_output_tokens_total", {"model": "sim"}, WORKER),
    ("inferq_cost_usd_total", {"model": "sim"}, WORKER),
    ("inferq_cache_misses_total", {"model": "sim"}, API),
    ("inferq_cache_hits_total", {"model": "sim"}, API),
    # Errors: each retried one, and the one that ended the job.
    ("inferq_backend_retries_total", {"model": "down"}, WORKER),
    ("inferq_backend_errors_total", {"model": "down"}, WORKER),
    ("inferq_limits_hit_total", {"limit": "requests"}, API),
    ("inferq_webhook_deliveries_total", {"outcome": "delivered"}, BEAT),
    ("inferq_sweeper_last_run_timestamp_seconds", {}, API),
]


@dataclass
class Stack:
    api_url: str
    metrics_urls: dict[str, str]  # process → its /metrics
    one_directory: bool  # PROMETHEUS_MULTIPROC_DIR: every process's metrics in every scrape
    prefix: str  # the deployment's queue prefix (its database's name)

    def client(self, key: str = BOOTSTRAP_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.Client(base_url=self.api_url, timeout=30, headers=headers)

    def samples(self, process: str) -> list[Sample]:
        text = httpx.get(self.metrics_urls[process], timeout=10).text
        return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sum of the samples of `name` whose labels include `labels`; None if there is none."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(found) if found else None


class Receiver:
    """A webhook endpoint on loopback that answers 204 and counts what it got."""

    def __init__(self) -> None:
        self.received = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.received += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def eventually(check: Callable[[], object], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture(scope="module", params=["per-process", "one-directory"])
def stack(
    request: pytest.FixtureRequest,
    platform: Platform,
    databases: Databases,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    scratch = tmp_path_factory.mktemp("metrics")
    database_url, name = create_database(databases.admin_url)
    upgrade(database_url)
    models = scratch / "models.toml"
    models.write_text(MODELS.format(fast=platform.sims["fast"].url, closed=free_port()))
    api_port, worker_port, beat_port = free_port(), free_port(), free_port()
    env = {
        "INFERQ_DATABASE_URL": database_url,
        "INFERQ_MODELS_FILE": str(models),
        "INFERQ_WORKER_METRICS_PORT": str(worker_port),
        "INFERQ_BEAT_METRICS_PORT": str(beat_port),
    }
    one_directory = request.param == "one-directory"
    if one_directory:
        metrics_dir = scratch / "prometheus"
        metrics_dir.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    tag = f"metrics-{request.param}"
    children: list[Child] = []
    try:
        children.append(platform.spawn("api", "--port", str(api_port), name=f"api-{tag}", **env))
        worker = platform.spawn(
            "worker", "--models", "sim,down", "--concurrency", "4",
            "--name", f"{tag}@inferq-test", name=f"worker-{tag}", **env,
        )  # fmt: skip
        children.append(worker)
        schedule = str(scratch / "beat-schedule")
        children.append(platform.spawn("beat", "--schedule", schedule, name=f"beat-{tag}", **env))
        api_url = f"http://127.0.0.1:{api_port}"
        wait_http(f"{api_url}/readyz", children[0])
        urls = {
            API: f"{api_url}/metrics",
            WORKER: f"http://127.0.0.1:{worker_port}/metrics",
            BEAT: f"http://127.0.0.1:{beat_port}/metrics",
        }
        wait_http(urls[WORKER], children[1])
        wait_http(urls[BEAT], children[2])
        stack = Stack(api_url, urls, one_directory, prefix=name)
        _work(stack)
        yield stack
    finally:
        for child in reversed(children):
            child.stop()
        drop_database(databases.admin_url, name)


def _work(stack: Stack) -> None:
    """Everything the metrics count, done once through the deployment's API."""
    receiver = Receiver()
    try:
        with stack.client() as http:
            body = {"model": "sim", "prompt": "count me", "max_tokens": 24, "seed": 11}
            first = submit(http, **body, webhook={"url": receiver.url})
            assert wait_for(http, first["id"])["status"] == "succeeded"
            assert submit(http, **body)["cached"] is True
            failed = wait_for(http, submit(http, model="down", prompt="no one there")["id"])
            assert failed["status"] == "failed"
            response = http.post(
                "/v1/admin/keys",
                json={"name": "metrics", "tenant": "metrics", "rate_limit_per_minute": 1},
            )
            assert response.status_code == 201, response.text
            limited_key = response.json()["secret"]
        with stack.client(limited_key) as limited:
            assert (
                limited.post("/v1/jobs", json={"model": "idle", "prompt": "a"}).status_code == 202
            )
            assert (
                limited.post("/v1/jobs", json={"model": "idle", "prompt": "b"}).status_code == 429
            )
        eventually(lambda: receiver.received >= 1, "the webhook was not delivered")
    finally:
        receiver.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("name", "labels", "process"), EXPECTED)
def test_each_metric_is_exported_by_the_process_that_counts_it(
    stack: Stack, name: str, labels: dict[str, str], process: str
) -> None:
    scraped = API if stack.one_directory else process
    # Beat records a delivery just after the receiver answered; the sweeper passes each 0.5 s.
    eventually(
        lambda: (value(stack.samples(scraped), name, **labels) or 0) > 0,
        f"{name}{labels} is not above 0 on the {scraped}'s /metrics",
        seconds=10,
    )


def test_counts_match_the_work_done(stack: Stack) -> None:
    scraped = {p: stack.samples(API if stack.one_directory else p) for p in (API, WORKER)}
    api, worker = scraped[API], scraped[WORKER]
    # Three jobs of `sim` and `down` accepted (the cache hit is a job too), one of `idle`.
    assert value(api, "inferq_jobs_submitted_total", model="sim") == 2
    assert value(api, "inferq_jobs_submitted_total", model="down") == 1
    assert value(api, "inferq_cache_misses_total", model="sim") == 1
    assert value(api, "inferq_cache_hits_total", model="sim") == 1
    assert value(api, "inferq_limits_hit_total", limit="requests") == 1
    # The worker ran one `sim` job (the hit never reached it) and one `down` job.
    assert value(worker, "inferq_jobs_finished_total", model="sim", status="succeeded") == 1
    assert value(worker, "inferq_jobs_finished_total", model="down", status="failed") == 1
    assert value(worker, "inferq_ttft_seconds_count", model="sim") == 1
    assert value(worker, "inferq_job_duration_seconds_count", model="sim") == 1
    assert (value(worker, "inferq_output_tokens_total", model="sim") or 0) > 1
    # A refused connection is retried (INFERQ_BACKEND_RETRIES=3 in the test settings); the
    # last try's error is the job's one final error, the tries before it are retries.
    assert value(worker, "inferq_backend_errors_total", model="down") == 1
    for name in ("inferq_backend_errors_total", "inferq_backend_retries_total"):
        kinds = {s.labels.get("type") for s in worker if s.name == name}
        assert kinds and None not in kinds and "" not in kinds, f"{name} without its error type"
    assert (value(worker, "inferq_backend_retries_total", model="down") or 0) >= 1
    # One observation between each pair of consecutive tokens (at least one pair here).
    assert (value(worker, "inferq_inter_token_seconds_count", model="sim") or 0) >= 1


def test_queue_depth_and_sse_connections_follow_the_platform(stack: Stack) -> None:
    idle_queue = queue_name(stack.prefix, "idle")
    # The `idle` job waits: no worker serves its model. The API samples every 5 s.
    eventually(
        lambda: value(stack.samples(API), "inferq_queue_depth", queue=idle_queue) == 1,
        f"inferq_queue_depth of {idle_queue} did not reach 1",
    )
    assert (
        value(stack.samples(API), "inferq_queue_depth", queue=queue_name(stack.prefix, "sim")) == 0
    )
    assert value(stack.samples(API), "inferq_sse_connections") == 0
    with stack.client() as http:
        job = http.post("/v1/jobs", json={"model": "idle", "prompt": "watched"}).json()
        with connect_sse(http, "GET", f"/v1/jobs/{job['id']}/events") as source:
            assert source.response.status_code == 200
            events = source.iter_sse()  # held: dropping the iterator closes the connection
            assert next(events).event == "status"
            assert value(stack.samples(API), "inferq_sse_connections") == 1
        eventually(
            lambda: value(stack.samples(API), "inferq_sse_connections") == 0,
            "the closed stream is still counted",
        )


def test_the_sweeper_pulse_is_recent(stack: Stack) -> None:
    eventually(
        lambda: (
            (value(stack.samples(API), "inferq_sweeper_last_run_timestamp_seconds") or 0)
            > time.time() - 30
        ),
        "no sweeper pass in the last 30 s",
    )


def test_metrics_files_of_one_host_are_shared(stack: Stack) -> None:
    """With one directory the worker's and the API's scrapes agree; without, they differ."""
    api = value(stack.samples(API), "inferq_jobs_finished_total")
    worker = value(stack.samples(WORKER), "inferq_jobs_finished_total")
    if stack.one_directory:
        assert api == worker and api
    else:
        assert api is None and worker


@pytest.mark.parametrize("amount", [0.0, 0.004, 0.01, 0.2, 7.0, 1e6])
@pytest.mark.parametrize("times", [0, 1, 13])
def test_a_value_observed_many_times_at_once_is_recorded_as_observed_one_by_one(
    amount: float, times: int
) -> None:
    one_by_one, at_once = (
        Histogram("gap_seconds", "gap", ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        for registry in (CollectorRegistry(), CollectorRegistry())
    )
    child = one_by_one.labels("m")
    for _ in range(times):
        child.observe(amount)
    observe_times(at_once.labels("m"), amount, times)

    def samples(histogram: Histogram) -> dict[tuple[str, str], float]:
        (family,) = histogram.collect()
        return {  # `_created` is when the metric was made: not an observation's
            (s.name, s.labels.get("le", "")): s.value
            for s in family.samples
            if not s.name.endswith("_created")
        }

    # the sum up to the rounding of one product against as many additions
    assert samples(at_once) == pytest.approx(samples(one_by_one), rel=1e-12)
    with pytest.raises(ValueError):  # as `observe` refuses the metric that has labels
        observe_times(at_once, amount, times or 1)
