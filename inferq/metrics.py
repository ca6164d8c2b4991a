"""Prometheus metrics shared by the API and the workers (DESIGN §9)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
SSE_CONNECTIONS = Gauge("inferq_sse_connections", "Open SSE connections")
QUEUE_DEPTH = Gauge("inferq_queue_depth", "Messages waiting in a queue", ["queue"])
