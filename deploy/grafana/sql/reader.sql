-- The role Grafana reads Postgres as (deploy/grafana/provisioning/datasources/postgres.yml).
-- It may read the figures of jobs, feedback and evaluations, and nothing else: no prompt,
-- answer, comment, rationale, error message, metadata or key.
--
-- `inferq migrate` makes this role itself when INFERQ_GRAFANA_DB_PASSWORD is set (what
-- docker compose and the Kubernetes migrate Job do), with exactly these grants
-- (inferq/grafana.py). This file is for a database whose inferq user may not create roles:
-- its owner runs it once, after the migrations, with psql, the password in a psql variable
-- (psql quotes it; never paste it into the file):
--   psql "$OWNER_DATABASE_URL" -v ON_ERROR_STOP=1 -v password="$GRAFANA_DB_PASSWORD" \
--     -f deploy/grafana/sql/reader.sql
-- Another role name: -v role=NAME (then set `user:` in the data source to match).
\if :{?role}
\else
  \set role grafana_reader
\endif
SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') AS create_role \gset
\if :create_role
  CREATE ROLE :"role" LOGIN PASSWORD :'password';
\else
  ALTER ROLE :"role" LOGIN PASSWORD :'password';
\endif
ALTER ROLE :"role" SET default_transaction_read_only = on;
ALTER ROLE :"role" SET statement_timeout = '30s';
GRANT CONNECT ON DATABASE :"DBNAME" TO :"role";
GRANT USAGE ON SCHEMA public TO :"role";
REVOKE ALL ON TABLE jobs, feedback, evaluations FROM :"role";
GRANT SELECT (
    id, tenant, "user", requested_model, model, status, priority, finish_reason, error_type,
    input_tokens, output_tokens, cost_usd, cached, attempts, judge_of, redacted_at,
    created_at, started_at, first_token_at, finished_at
) ON jobs TO :"role";
GRANT SELECT (id, job_id, rating, created_at) ON feedback TO :"role";
GRANT SELECT (id, job_id, judge_model, score, created_at, judged_at) ON evaluations
    TO :"role";
