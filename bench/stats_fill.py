"""Fill a database with a month of realistic jobs for the `/v1/stats` benchmark.

`python -m bench.stats_fill --database-url postgresql://…/inferq_stats --jobs 1000000`

The database is created and migrated if needed. Everything is made inside Postgres
(INSERT … SELECT over generate_series), so a million jobs take about a minute:

- tenant `bench` owns `--jobs` jobs (all of them ordinary: the figures the query reads),
  created uniformly over the `--days` days ending now and stored in creation order, as a
  live table is, so a query for those days covers every one of them; two other tenants
  hold 5% more, which the query must leave out;
- 5 keys (plus the bootstrap key, no row), 200 end users (and jobs with none), 4 models
  with their own prices and speeds; 93% succeeded, 3% failed, 2% cancelled, 2% expired;
  10% answered from the cache (all four timestamps equal, as a cache hit's are);
- feedback on 3% of the succeeded jobs (80% thumbs up), judge evaluations of 5%, each with
  the judge's own job (`judge_of` set), which the query must leave out.
"""

from __future__ import annotations

import time

import click
import psycopg

from bench.servers import libpq_url
from inferq.migrate import create_database_if_missing, upgrade

TENANT = "bench"
KEY_NAMES = ("web", "mobile", "batch", "partner", "internal")
OTHER_TENANTS = ("acme", "globex")
CHUNK = 200_000

# name, share of jobs, $ per million input/output tokens, median TTFT (ms), inter-token (ms)
MODELS = (
    ("small", 0.50, 0.25, 1.25, 80, 10),
    ("medium", 0.30, 1.00, 4.00, 150, 20),
    ("large", 0.15, 3.00, 15.00, 300, 40),
    ("code", 0.05, 0.50, 2.00, 120, 15),
)

# One row per job: its draws first (`r`), then the timestamps they give (`t`).
INSERT_JOBS = """
WITH models(name, lo, hi, price_in, price_out, ttft, itl) AS (VALUES {models}),
keys AS (SELECT array_agg(id ORDER BY name) AS ids FROM api_keys WHERE tenant = %(tenant)s),
r AS (
    SELECT g,
           %(start)s::timestamptz
               + (g + random()) / %(jobs)s * (now() - %(start)s::timestamptz) AS created_at,
           random() AS pick, random() AS fate, random() AS cache_draw,
           (20 + random() * 1500)::int AS input_tokens,
           (10 + random() * 490)::int AS output_tokens,
           -ln(1 - random()) * 200 AS queue_ms,
           exp(sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random()) * 0.4) AS spread,
           0.7 + random() * 0.6 AS pace,  -- this job's decoding speed against its model's
           random() AS partial,
           floor(random() * 6)::int AS key_pick,
           floor(random() * 220)::int AS user_pick
    FROM generate_series(%(first)s::int, %(last)s::int) AS g
),
t AS (
    SELECT r.*, m.*,
           CASE WHEN fate < 0.93 THEN 'succeeded' WHEN fate < 0.96 THEN 'failed'
                WHEN fate < 0.98 THEN 'cancelled' ELSE 'expired' END AS status,
           fate < 0.93 AND cache_draw < 0.10 AS cached
    FROM r JOIN models m ON r.pick >= m.lo AND r.pick < m.hi
),
u AS (
    SELECT t.*,
           (extract(epoch FROM created_at) * 1000)::bigint AS ms,
           CASE WHEN cached THEN 0 ELSE queue_ms END AS q,
           CASE WHEN cached THEN 0 ELSE ttft * spread END AS f,
           CASE WHEN status = 'succeeded' THEN output_tokens
                WHEN status = 'expired' THEN 0
                ELSE (output_tokens * partial)::int END AS produced
    FROM t
)
INSERT INTO jobs (id, tenant, api_key_id, requested_model, model, "user", status, priority,
                  input, params, output, finish_reason, error_type, error_message,
                  input_tokens, output_tokens, cost_usd, cached, attempts, metadata,
                  created_at, started_at, first_token_at, finished_at, webhook_done)
SELECT
    -- A UUIDv7: the creation time's milliseconds, then random bits.
    encode(set_byte(overlay(uuid_send(gen_random_uuid())
                            PLACING substring(int8send(ms) FROM 3 FOR 6) FROM 1 FOR 6),
                    6, (get_byte(uuid_send(gen_random_uuid()), 6) & 15) | 112), 'hex')::uuid,
    %(tenant)s,
    (SELECT ids[key_pick + 1] FROM keys),  -- the sixth pick is the bootstrap key (null)
    CASE WHEN g %% 4 = 0 THEN 'auto' ELSE name END,
    name,
    CASE WHEN user_pick < 200 THEN 'user-' || user_pick END,
    status,
    CASE WHEN g %% 5 = 0 THEN 'batch' ELSE 'interactive' END,
    jsonb_build_object('prompt', repeat('Summarise the quarterly report. ', 6)),
    '{{"max_tokens": 512}}'::jsonb,
    CASE WHEN status <> 'expired' THEN repeat('The quarter went well. ', produced / 5 + 1) END,
    CASE status WHEN 'succeeded' THEN 'length' WHEN 'cancelled' THEN 'cancelled' END,
    CASE status WHEN 'failed' THEN 'backend_error' WHEN 'expired' THEN 'deadline_exceeded' END,
    CASE status WHEN 'failed' THEN 'the backend answered 503'
                WHEN 'expired' THEN 'not started before its deadline' END,
    input_tokens,
    produced,
    CASE WHEN cached OR status = 'expired' THEN 0
         ELSE round((input_tokens * price_in + produced * price_out) / 1e6, 8) END,
    cached,
    CASE WHEN status = 'expired' THEN 0 ELSE 1 END,
    '{{}}'::jsonb,
    created_at,
    CASE WHEN status <> 'expired' THEN created_at + q * interval '1 ms' END,
    CASE WHEN status <> 'expired' AND produced > 0 THEN created_at + (q + f) * interval '1 ms' END,
    CASE WHEN status = 'expired' THEN created_at + interval '60 s'
         ELSE created_at + (q + f + CASE WHEN cached THEN 0 ELSE produced * itl * pace END)
                           * interval '1 ms' END,
    true
FROM u
"""

INSERT_FEEDBACK = """
INSERT INTO feedback (job_id, api_key_id, rating, comment, created_at)
SELECT id, api_key_id, CASE WHEN random() < 0.8 THEN 1 ELSE -1 END, NULL,
       finished_at + interval '2 min'
FROM jobs
WHERE tenant = %(tenant)s AND status = 'succeeded' AND judge_of IS NULL AND random() < 0.03
"""

# Each evaluation's judge job first (the tenant's, as the judge submits it), then the score.
INSERT_EVALUATIONS = """
WITH sampled AS (
    SELECT id, created_at, finished_at FROM jobs
    WHERE tenant = %(tenant)s AND status = 'succeeded' AND judge_of IS NULL
      AND random() < 0.05
),
judged AS (
    INSERT INTO jobs (id, tenant, requested_model, model, status, priority, input, params,
                      output, input_tokens, output_tokens, cost_usd, metadata, created_at,
                      started_at, first_token_at, finished_at, webhook_done, judge_of)
    SELECT gen_random_uuid(), %(tenant)s, 'large', 'large', 'succeeded', 'batch',
           '{"prompt": "Score this answer."}', '{}', 'Score: 4. Accurate and brief.',
           400, 12, 0.00138, '{}', finished_at + interval '1 s', finished_at + interval '2 s',
           finished_at + interval '2.3 s', finished_at + interval '2.8 s', true, id
    FROM sampled
    RETURNING id AS judge_job_id, judge_of
)
INSERT INTO evaluations (job_id, judge_job_id, judge_model, score, rationale, created_at,
                         judged_at)
SELECT judge_of, judge_job_id, 'large', (1 + floor(power(random(), 0.6) * 5))::int,
       'Accurate and brief.', now(), now()
FROM judged
"""


def models_values() -> str:
    """The models as SQL VALUES, each with its [lo, hi) slice of the unit interval."""
    rows, lo = [], 0.0
    for name, share, price_in, price_out, ttft, itl in MODELS:
        hi = 1.0 if name == MODELS[-1][0] else lo + share
        rows.append(f"('{name}', {lo}, {hi}, {price_in}, {price_out}, {ttft}, {itl})")
        lo = hi
    return ", ".join(rows)


def add_keys(conn: psycopg.Connection, tenant: str) -> None:
    for name in KEY_NAMES:
        conn.execute(
            "INSERT INTO api_keys (id, name, prefix, secret_sha256, tenant) "
            "VALUES (gen_random_uuid(), %s, 'iq_bench', md5(random()::text) || md5(random()::text),"
            " %s)",
            (name, tenant),
        )


def add_jobs(conn: psycopg.Connection, tenant: str, jobs: int, start: str) -> None:
    sql = INSERT_JOBS.format(models=models_values())
    for first in range(0, jobs, CHUNK):
        last = min(first + CHUNK, jobs) - 1
        began = time.monotonic()
        with conn.transaction():
            values = {"tenant": tenant, "start": start, "jobs": jobs, "first": first, "last": last}
            conn.execute(sql, values)
        click.echo(f"  {tenant}: jobs {first:,}-{last:,} in {time.monotonic() - began:.1f} s")


@click.command()
@click.option("--database-url", required=True, help="the database to fill (created if missing)")
@click.option("--jobs", default=1_000_000, show_default=True, help="the bench tenant's jobs")
@click.option("--days", default=30, show_default=True, help="days the jobs span, ending now")
def main(database_url: str, jobs: int, days: int) -> None:
    """Fill the database with a month of jobs, feedback and evaluations (see the module doc)."""
    create_database_if_missing(database_url)
    upgrade(database_url)
    began = time.monotonic()
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        start = conn.execute(
            "SELECT date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' "
            "- make_interval(days => %s)",
            (days - 1,),
        ).fetchone()
        assert start is not None
        for tenant, count in ((TENANT, jobs), *((t, jobs // 40) for t in OTHER_TENANTS)):
            add_keys(conn, tenant)
            add_jobs(conn, tenant, count, start[0].isoformat())
        conn.execute(INSERT_FEEDBACK, {"tenant": TENANT})
        conn.execute(INSERT_EVALUATIONS, {"tenant": TENANT})
        conn.execute("VACUUM ANALYZE jobs")
        conn.execute("VACUUM ANALYZE feedback")
        conn.execute("VACUUM ANALYZE evaluations")
    click.echo(f"filled in {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main(prog_name="python -m bench.stats_fill")
