"""Fixtures for end-to-end tests against the loopback Discord emulator.

Async fixtures here run in the session event loop (the project's default fixture loop scope), so
test modules using them need ``pytestmark = pytest.mark.asyncio(loop_scope="session")``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio

from bot.client import LlavaBot
from bot.config import Config, parse_config
from bot.services import build_services
from tests.e2e.discord_emulator import DiscordEmulator, running_bot
from tests.e2e.helpers import ReferenceEngines


@pytest_asyncio.fixture
async def emulator() -> AsyncIterator[DiscordEmulator]:
    """A fresh emulated Discord (REST, gateway and CDN) on a random port of 127.0.0.1."""
    async with DiscordEmulator() as emu:
        yield emu


@pytest_asyncio.fixture
async def bot_config(tiny_llava: tuple[Path, Path], tmp_path: Path) -> Config:
    """Settings of a bot that answers with the tiny model and keeps its history in a fresh SQLite file."""
    return parse_config(
        {
            "discord": {"token": "emulated", "edit_interval": 0.2, "admin_ids": []},
            "model": {
                "dir": str(tiny_llava[1]),
                "precision": "INT4",
                "engine": "genai",
                "max_new_tokens": 24,
                "ov_config": {"CACHE_DIR": str(tmp_path / "ov-cache")},
            },
            "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'bot.sqlite3'}"},
        }
    )


@pytest_asyncio.fixture
async def scripted_config(scripted_engine: str, tmp_path: Path) -> Config:
    """Settings of a bot that answers with the scripted engine (no model) and a fresh SQLite file."""
    return parse_config(
        {
            "discord": {"token": "emulated", "edit_interval": 0.2, "admin_ids": []},
            # The folder need not exist: the scripted engine reads nothing from it.
            "model": {"dir": str(tmp_path / "model"), "precision": "INT4", "engine": scripted_engine},
            "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'bot.sqlite3'}"},
        }
    )


@asynccontextmanager
async def llava_bot(config: Config, emulator: DiscordEmulator) -> AsyncIterator[LlavaBot]:
    """The real bot on services built from ``config``, connected to the emulator, ready; all closed on exit."""
    services = await build_services(config)
    try:
        async with running_bot(LlavaBot(config, services, guild_ready_timeout=0.05), emulator, ready_timeout=60) as bot:
            yield bot
    finally:
        await services.close()


@pytest.fixture(scope="session")
def reference() -> Iterator[ReferenceEngines]:
    """The engine alone, for computing the answers the bot must give; shared by the whole session."""
    engines = ReferenceEngines()
    yield engines
    engines.close()
