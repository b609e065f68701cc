"""Database engine, sessions and schema migrations.

Any SQLAlchemy async URL works; SQLite through aiosqlite is the default and gets the extra care it needs
to serve many channels from one process (WAL, a busy timeout, foreign keys).

The schema is owned by the Alembic scripts in ``migrations/``. There is no ``alembic.ini``: the
configuration is built here, so ``llava-bot db upgrade`` and the bot's start-up share one code path::

    await upgrade(url)          # from async code, e.g. build_services
    upgrade_sync(url)           # from synchronous code, e.g. the CLI
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Connection, CursorResult, event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

log = logging.getLogger(__name__)


def _migrations_dir() -> Path:
    # Installed, the scripts are the package ``bot.migrations``; in a source checkout they are the top-level
    # ``migrations/`` folder that package is built from. A checkout run from its own folder uses its own
    # scripts even when the environment has another checkout installed in editable mode.
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "migrations" / "env.py").is_file():
        return checkout / "migrations"
    try:
        folder = Path(str(importlib.resources.files("bot.migrations")))
    except ModuleNotFoundError:
        folder = checkout / "migrations"
    return folder


MIGRATIONS_DIR = _migrations_dir()

# Long enough to ride out a burst of writers from busy channels; a write waiting this long means
# something is stuck, and failing then is better than hanging forever.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def _is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def _is_sqlite_file(url: URL) -> bool:
    database = url.database or ""
    return _is_sqlite(url) and database not in ("", ":memory:") and not database.startswith("file:")


def _is_missing_sqlite_file(url: URL) -> bool:
    return _is_sqlite_file(url) and not Path(url.database or "").expanduser().exists()


def _set_sqlite_pragmas(dbapi_connection: Any, _connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # Set first, so that switching the journal mode below also waits instead of failing.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        # WAL lets readers proceed while one channel writes; the mode is stored in the file, so this
        # only does work on the first connection to a new database.
        cursor.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL is still corruption-safe; only the last commits can be lost on power failure.
        cursor.execute("PRAGMA synchronous = NORMAL")
        # SQLite ignores foreign keys unless asked, per connection.
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def open_database(url: str | URL, *, echo: bool = False) -> AsyncEngine:
    """Open the database at ``url``: the SQLAlchemy async engine (a connection pool), not an inference engine.

    For a SQLite file the parent folder is created, and every connection gets WAL journaling, a busy
    timeout and foreign-key enforcement. Transactions on SQLite keep the driver's default behaviour: a
    transaction starts at the first write, so a unit of work that reads before it writes never holds a
    stale read snapshot that would make its write fail with "database is locked".
    """
    url = make_url(url)
    if _is_sqlite_file(url):
        assert url.database is not None
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, echo=echo)
    if _is_sqlite(url):
        event.listen(engine.sync_engine, "connect", _set_sqlite_pragmas)
    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for ``engine``, one per unit of work.

    Objects stay readable after commit so that results can be copied out once the session is closed.
    """
    return async_sessionmaker(engine, expire_on_commit=False)


def rowcount(result: Any) -> int:
    """How many rows an UPDATE or DELETE executed in a session touched (its result is a CursorResult)."""
    return cast(CursorResult[Any], result).rowcount


def create_migration_engine(url: str | URL) -> AsyncEngine:
    """An engine for running migrations: on SQLite, each migration is one real transaction.

    The driver's default never wraps DDL in a transaction, so a migration failing halfway would leave
    tables behind while the version stamp says they don't exist. SQLite itself supports transactional
    DDL; it only needs the driver to stop managing transactions and SQLAlchemy to emit BEGIN.
    """
    url = make_url(url)
    engine = open_database(url)
    if _is_sqlite(url):

        def on_connect(dbapi_connection: Any, _connection_record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                # Batch migrations rebuild tables by dropping and recreating them; with enforcement on,
                # dropping a parent table would cascade into its children. env.py checks them afterwards.
                cursor.execute("PRAGMA foreign_keys = OFF")
            finally:
                cursor.close()
            dbapi_connection.isolation_level = None

        def on_begin(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN")

        event.listen(engine.sync_engine, "connect", on_connect)
        event.listen(engine.sync_engine, "begin", on_begin)
    return engine


def alembic_config(url: str | URL | None = None) -> Config:
    """The Alembic configuration for this project, without any ``alembic.ini``.

    ``url`` is handed to ``migrations/env.py`` as an attribute rather than an ini option, so that
    passwords containing ``%`` survive and are never written anywhere.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if url is not None:
        config.attributes["url"] = url
    return config


def head_revision() -> str:
    """The newest revision the migration scripts know about."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the migrations folder holds no revisions"
    return head


def _run_command(connection: Connection, config: Config, name: str, revision: str) -> None:
    # env.py picks up this connection instead of opening its own (Alembic's documented recipe for
    # sharing a connection, which is what lets migrations run inside an already running event loop).
    config.attributes["connection"] = connection
    getattr(command, name)(config, revision)


async def _migrate(url: str | URL, name: str, revision: str) -> None:
    engine = create_migration_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_command, alembic_config(url), name, revision)
    finally:
        await engine.dispose()


async def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``, creating it if needed."""
    log.info("Upgrading the database schema to %s", revision)
    await _migrate(url, "upgrade", revision)


async def downgrade(url: str | URL, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"`` removes every table)."""
    log.info("Downgrading the database schema to %s", revision)
    await _migrate(url, "downgrade", revision)


def upgrade_sync(url: str | URL, revision: str = "head") -> None:
    """Synchronous :func:`upgrade`, for callers without an event loop such as the CLI."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("upgrade_sync() cannot run inside an event loop; await upgrade() instead")
    asyncio.run(upgrade(url, revision))


async def current_revision(url: str | URL) -> str | None:
    """The revision the database at ``url`` is at, or ``None`` if it has never been migrated."""
    url = make_url(url)
    # Asking about a SQLite file that isn't there should not leave an empty one behind.
    if _is_missing_sqlite_file(url):
        return None
    engine = open_database(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())
    finally:
        await engine.dispose()
