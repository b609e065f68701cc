"""Fixtures for the store tests: real SQLite files in a temporary folder, migrated by Alembic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, table
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.store import HistoryStore, StoredImage, open_database, session_factory, upgrade
from tests.postgres import PostgresServer


def sqlite_url(path: Path) -> str:
    """An aiosqlite URL for a database file."""
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def sqlite_db_url(tmp_path: Path) -> str:
    # A folder that does not exist yet, as on a fresh install.
    return sqlite_url(tmp_path / "data" / "bot.db")


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, sqlite_db_url: str) -> str:
    """A new, empty database on each backend the bot supports."""
    if request.param == "sqlite":
        return sqlite_db_url
    server: PostgresServer = request.getfixturevalue("postgres")
    return await server.new_database()


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade(db_url)
    engine = open_database(db_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def sqlite_engine(sqlite_db_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade(sqlite_db_url)
    engine = open_database(sqlite_db_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def store(engine: AsyncEngine) -> HistoryStore:
    return HistoryStore(session_factory(engine))


def image(tag: bytes = b"cat") -> StoredImage:
    """Stand-in image bytes; the store never decodes them."""
    return StoredImage(data=b"\x89PNG\r\n\x1a\n" + tag * 100, mime="image/png", width=64, height=48)


async def count_rows(engine: AsyncEngine, name: str) -> int:
    """How many rows a table holds."""
    async with engine.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(table(name)))).scalar_one()
