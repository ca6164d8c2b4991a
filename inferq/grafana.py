"""Grafana's read-only role on Postgres, for the per-user panels of the usage dashboard.

`inferq migrate` makes it after the migrations when INFERQ_GRAFANA_DB_PASSWORD is set, and
brings it up to date on every run (password, settings, grants), so a rotated password or a
column added to what it may read takes effect with the next migration. It may read the
figures of jobs, feedback and evaluations and nothing else: no prompt, answer, comment,
rationale, error message, metadata or key. deploy/grafana/sql/reader.sql makes the same
role by hand with psql, for a database whose owner may not create roles.
"""

from __future__ import annotations

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

READER_ROLE = "grafana_reader"
# What the reader may select, table by table.
READER_COLUMNS: dict[str, tuple[str, ...]] = {
    "jobs": (
        "id", "tenant", "user", "requested_model", "model", "status", "priority",
        "finish_reason", "error_type", "input_tokens", "output_tokens", "cost_usd", "cached",
        "attempts", "judge_of", "redacted_at", "created_at", "started_at", "first_token_at",
        "finished_at",
    ),
    "feedback": ("id", "job_id", "rating", "created_at"),
    "evaluations": ("id", "job_id", "judge_model", "score", "created_at", "judged_at"),
}  # fmt: skip
# The role's sessions: read-only, and a query that runs away is stopped.
READER_SETTINGS = {"default_transaction_read_only": "on", "statement_timeout": "30s"}
# Two migrations at once (a Job retried while the first still runs) make the role once.
_LOCK = 0x696E6671_6772  # "infq" "gr"


def libpq_url(database_url: str) -> str:
    """The URL as libpq reads it (without SQLAlchemy's `+driver`)."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def ensure_reader(database_url: str, password: str, role: str = READER_ROLE) -> bool:
    """Create the reader role, or set an existing one's password and grants; True if created.

    The password reaches the server as a SCRAM verifier computed here (as psql's \\password
    does), never in clear text: statement logs and pg_stat_activity never show it.
    """
    if not password:
        raise ValueError("the reader's password is empty")
    name = sql.Identifier(role)
    with psycopg.connect(libpq_url(database_url)) as db, db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        verifier = db.pgconn.encrypt_password(password.encode(), role.encode())
        exists = db.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        verb = sql.SQL("ALTER") if exists else sql.SQL("CREATE")
        db.execute(
            sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                verb, name, sql.Literal(verifier.decode())
            )
        )
        for setting, value in READER_SETTINGS.items():
            db.execute(
                sql.SQL("ALTER ROLE {} SET {} = {}").format(
                    name, sql.SQL(setting), sql.Literal(value)
                )
            )
        db.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(db.info.dbname), name
            )
        )
        db.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(name))
        for table, columns in READER_COLUMNS.items():
            # Revoking the table's privileges revokes its columns' too: a column taken off
            # the list is no longer readable.
            db.execute(
                sql.SQL("REVOKE ALL ON TABLE {} FROM {}").format(sql.Identifier(table), name)
            )
            db.execute(
                sql.SQL("GRANT SELECT ({}) ON TABLE {} TO {}").format(
                    sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table), name
                )
            )
    return exists is None
