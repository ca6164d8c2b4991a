"""Prometheus metrics shared by the API and the workers."""

from __future__ import annotations

import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

JOBS_SUBMITTED = Counter("inferq_jobs_submitted", "Jobs accepted", ["model"])
JOBS_FINISHED = Counter("inferq_jobs_finished", "Jobs ended", ["model", "status"])
QUEUE_WAIT = Histogram(
    "inferq_queue_wait_seconds", "Submit to claim", ["model"], buckets=LATENCY_BUCKETS
)
TTFT = Histogram("inferq_ttft_seconds", "Submit to first token", ["model"], buckets=LATENCY_BUCKETS)
DURATION = Histogram(
    "inferq_job_duration_seconds", "Submit to end", ["model"], buckets=LATENCY_BUCKETS
)
INPUT_TOKENS = Counter("inferq_input_tokens", "Input tokens", ["model"])
OUTPUT_TOKENS = Counter("inferq_output_tokens", "Output tokens", ["model"])
COST = Counter("inferq_cost_usd", "Cost in USD", ["model"])
BACKEND_ERRORS = Counter("inferq_backend_errors", "Backend errors", ["model", "type"])
# Every backend error that another try within the attempt follows (BACKEND_ERRORS counts the
# ones that ended a job).
BACKEND_RETRIES = Counter(
    "inferq_backend_retries", "Backend errors retried within an attempt", ["model", "type"]
)
# The gap between two tokens of a stream as its worker reads them (averaged over the tokens
# it reads together, once a flush under load): the backend's pace, plus whatever the worker
# adds when it is short of CPU.
INTER_TOKEN = Histogram(
    "inferq_inter_token_seconds",
    "Gap between a stream's consecutive tokens, in the worker",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 5),
)
ROUTES = Counter("inferq_routes", "Jobs for `auto`, by the model routed to", ["target"])
# Gauges say how processes combine when several share one scrape (see `exposition`).
SSE_CONNECTIONS = Gauge(
    "inferq_sse_connections", "Open SSE connections", multiprocess_mode="livesum"
)
QUEUE_DEPTH = Gauge(
    "inferq_queue_depth", "Messages waiting in a queue", ["queue"], multiprocess_mode="max"
)
# Set by beat's sweeper after each pass (beat's /metrics), and by each API process from the
# pass's time in Redis (the API's /metrics): an alert sees it wherever beat is not scraped.
SWEEPER_LAST_RUN = Gauge(
    "inferq_sweeper_last_run_timestamp_seconds",
    "Unix time of the sweeper's last complete pass (0: none seen)",
    multiprocess_mode="max",
)
WEBHOOK_DELIVERIES = Counter(
    "inferq_webhook_deliveries",
    "Webhook delivery tries by outcome: delivered, retrying, gave_up, refused",
    ["outcome"],
)
# A message for a job this deployment's database does not hold: most likely another
# deployment's worker shares the Redis and its queue names.
WORKER_UNKNOWN_JOBS = Counter(
    "inferq_worker_unknown_jobs", "Deliveries of job ids the database does not hold"
)
LIMITS_HIT = Counter(
    "inferq_limits_hit",
    "Submits refused by a per-key limit: requests, tokens, budget, queue",
    ["limit"],
)
CACHE_HITS = Counter("inferq_cache_hits", "Cacheable submits answered from the cache", ["model"])
CACHE_MISSES = Counter(
    "inferq_cache_misses", "Cacheable submits the cache could not answer", ["model"]
)
JOBS_RELEASED = Counter(
    "inferq_jobs_released",
    "Running jobs a stopping worker handed back to the queue after its grace period",
    ["model"],
)

# The quality loop (docs/quality.md): ratings in the API, judge verdicts and retention in beat.
FEEDBACK = Counter(
    "inferq_feedback", "Ratings of jobs' answers by model and rating: up, down", ["model", "rating"]
)
JUDGE_SCORE = Histogram(
    "inferq_judge_score",
    "Judge scores (1-5) of sampled jobs, by the judged job's model",
    ["model"],
    buckets=(1, 2, 3, 4, 5),
)
JUDGE_VERDICTS = Counter(
    "inferq_judge_verdicts",
    "Judge verdicts by the judged job's model and outcome: scored, unparseable, failed",
    ["model", "outcome"],
)
RETENTION_CLEARED = Counter(
    "inferq_retention_cleared_jobs", "Jobs whose texts retention cleared (their figures stay)"
)


def registry() -> CollectorRegistry:
    """What one scrape shows: this process's metrics, or every process's on this host.

    With PROMETHEUS_MULTIPROC_DIR set (`inferq up` sets it), each process writes its
    metrics to files there and a scrape of any of them adds them all up, so the API's
    /metrics carries what the worker counted. Separate hosts are scraped one by one.
    """
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    combined = CollectorRegistry()
    multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
    return combined


def observe_times(histogram: Histogram, amount: float, times: int) -> None:
    """`times` observations of `amount`, recorded as that many `observe` calls record them:
    the sum raised by `amount * times` and one bucket's count by `times`, each once.

    prometheus_client observes one value at a time, each under its values' locks; a stream's
    read brings ten tokens or so with one gap between them. tests/test_metrics.py pins this
    to `observe`.
    """
    if times <= 0:
        return
    histogram._raise_if_not_observable()  # type: ignore[no-untyped-call]  # a parent, say
    histogram._sum.inc(amount * times)
    for bound, bucket in zip(histogram._upper_bounds, histogram._buckets, strict=True):
        if amount <= bound:
            bucket.inc(times)
            break


def exposition() -> bytes:
    return generate_latest(registry())
