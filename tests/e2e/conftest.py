"""Fixtures for end-to-end tests against the loopback Discord emulator.

Async fixtures here run in the session event loop (the project's default fixture loop scope), so
test modules using them need ``pytestmark = pytest.mark.asyncio(loop_scope="session")``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.e2e.discord_emulator import DiscordEmulator


@pytest_asyncio.fixture
async def emulator() -> AsyncIterator[DiscordEmulator]:
    """A fresh emulated Discord (REST, gateway and CDN) on a random port of 127.0.0.1."""
    async with DiscordEmulator() as emu:
        yield emu
