"""Migrations: upgrade, no drift from the models (`alembic check`), downgrade, upgrade again."""

from __future__ import annotations

from alembic import command

from inferq.migrate import alembic_config
from tests.servers import Databases, create_database, drop_database


def test_migrations_match_the_models_and_reverse(databases: Databases) -> None:
    url, name = create_database(databases.admin_url)
    try:
        config = alembic_config(url)
        command.upgrade(config, "head")
        command.check(config)  # raises when the models and the migrations disagree
        command.downgrade(config, "base")
        command.upgrade(config, "head")
    finally:
        drop_database(databases.admin_url, name)
