"""Alembic environment of the service's database (run by ``Database.upgrade``).

The connection comes from the caller (``config.attributes["connection"]``):
no ``alembic.ini`` and no URL are needed. For a hand-run Alembic command,
``sqlalchemy.url`` in the config is used instead.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from columnhub.service.db import Base

target_metadata = Base.metadata


def run_migrations() -> None:
    """Run the migrations on the given connection (or on ``sqlalchemy.url``)."""
    connection = context.config.attributes.get("connection")
    if connection is None:
        engine = sa.create_engine(context.config.get_main_option("sqlalchemy.url") or "")
        with engine.begin() as conn:
            _run(conn)
        engine.dispose()
        return
    _run(connection)


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
