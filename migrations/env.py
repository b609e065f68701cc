"""Alembic environment for the conversation store.

Normally run through ``bot.store.db`` (``upgrade``/``downgrade``), which passes an open connection in
``config.attributes["connection"]``. Without one, this opens its own engine from ``attributes["url"]`` or
the ``sqlalchemy.url`` option; ``--sql`` (offline) mode renders the SQL for that URL instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import Connection, make_url

from bot.store.db import create_migration_engine
from bot.store.tables import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: pass one to bot.store.db.alembic_config(url)")
    return make_url(url).render_as_string(hide_password=False)


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        # SQLite can alter little in place; batch mode rebuilds the table instead.
        render_as_batch=True,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit the migration SQL for the configured URL instead of running it."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations over an open (synchronous facade of an async) connection."""
    # create_migration_engine makes SQLite emit a real BEGIN, so its DDL is transactional after all and the
    # whole upgrade either happens or leaves the database as it was.
    sqlite = connection.dialect.name == "sqlite"
    _configure(connection=connection, transactional_ddl=True if sqlite else None)
    with context.begin_transaction():
        context.run_migrations()
        if sqlite:
            # Foreign keys are off while migrating (see create_migration_engine); raising here, before the
            # commit, undoes a migration that broke them.
            problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if problems:
                raise RuntimeError(f"migrations left {len(problems)} dangling foreign keys: {problems[:5]}")


async def run_async_migrations() -> None:
    """Open an engine for the configured URL and run the migrations over it."""
    engine = create_migration_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Run the migrations over the shared connection if there is one, else over a new engine."""
    connection = config.attributes.get("connection")
    if connection is None:
        asyncio.run(run_async_migrations())
    else:
        do_run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
