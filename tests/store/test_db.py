"""Engine set-up: what SQLite needs to serve the bot safely."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.store import alembic_config
from bot.store.db import MIGRATIONS_DIR

# The engine fixture and the tests must share one event loop, as the bot's resources do.
in_session_loop = pytest.mark.asyncio(loop_scope="session")


@in_session_loop
async def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(sqlite_engine: AsyncEngine) -> None:
    async with sqlite_engine.connect() as connection:
        assert (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar_one() == "wal"
        assert (await connection.exec_driver_sql("PRAGMA busy_timeout")).scalar_one() > 0


@in_session_loop
async def test_sqlite_enforces_foreign_keys(sqlite_engine: AsyncEngine) -> None:
    with pytest.raises(IntegrityError):
        async with sqlite_engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO turns (channel_id, role, text, image_sha256, message_ids)"
                    " VALUES (1, 'user', 'hi', :missing, '[]')"
                ),
                {"missing": "0" * 64},
            )


@in_session_loop
async def test_turn_roles_are_checked(engine: AsyncEngine) -> None:
    with pytest.raises(IntegrityError):
        async with engine.begin() as connection:
            await connection.execute(
                text("INSERT INTO turns (channel_id, role, text, message_ids) VALUES (1, 'system', 'x', '[]')")
            )


def test_migrations_are_found_next_to_the_package_without_an_ini_file() -> None:
    config = alembic_config()

    assert config.config_file_name is None
    assert config.get_main_option("script_location") == str(MIGRATIONS_DIR)
    assert (MIGRATIONS_DIR / "env.py").is_file()
