"""Two real `llava-bot run` processes, shard 0 and shard 1 of two, sharing one SQLite database.

Each guild's events reach only the process running its shard, so every mention is answered exactly once,
by the process that owns the guild, and the conversation lands in the shared database.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bot.store.db import open_database, session_factory
from bot.store.history import HistoryStore
from tests.e2e.bot_process import BotProcess
from tests.e2e.discord_emulator import DiscordEmulator, shard_of
from tests.e2e.helpers import png, text_of, wait_answer

pytestmark = pytest.mark.asyncio(loop_scope="session")


def shard_config(shard: int, database_url: str) -> dict[str, dict[str, Any]]:
    return {
        "discord": {"shard_count": 2, "shard_ids": [shard]},
        # The scripted engine answers: what is tested is who answers, not what.
        "model": {"engine": "scripted"},
        "database": {"url": database_url},
    }


async def stored_turns(database_url: str, channel_ids: list[int]) -> dict[int, list[str]]:
    """The roles of the turns each channel has in the database, as a fresh reader sees them."""
    engine = open_database(database_url)
    try:
        store = HistoryStore(session_factory(engine))
        return {c: [t.role for t in await store.turns(c)] for c in channel_ids}
    finally:
        await engine.dispose()


async def test_two_shard_processes_answer_their_own_guilds(tmp_path: Path, emulator: DiscordEmulator) -> None:
    # Guild ids chosen so that each shard owns at least one guild besides the main one, wherever that lands.
    people = [emulator.user, emulator.other_user, emulator.admin]
    for shard in (0, 1):
        emulator.add_guild(f"On shard {shard}", guild_id=emulator.snowflake_on_shard(shard, 2), members=people)
    owner = {g: shard_of(g, 2) for g in emulator.guilds}
    assert sorted(set(owner.values())) == [0, 1]
    channels = {g.id: g.system_channel_id for g in emulator.guilds.values()}
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'shared.sqlite3'}"
    processes = [
        BotProcess(emulator, tmp_path / "no-model", tmp_path / f"shard{s}", shard_config(s, database_url))
        for s in (0, 1)
    ]
    try:
        # One after the other: the first start creates the shared database's schema.
        for process in processes:
            await process.start()
        await emulator.wait_for(lambda: emulator.connected_shards == {(0, 2), (1, 2)}, 60)
        # A different person in each guild: one person gets one answer at a time, wherever they ask.
        asked = {
            g: await emulator.user_message(
                channel, person, f"What is in guild {i}?", attachments=[("a.png", png(seed=i), "image/png")]
            )
            for i, ((g, channel), person) in enumerate(zip(channels.items(), people, strict=True))
        }
        answers = {g: text_of(await wait_answer(emulator, question, within=120)) for g, question in asked.items()}
        await emulator.wait_quiet(1.0, timeout=60)
        for i, (g, channel) in enumerate(channels.items()):
            assert f"You asked 'What is in guild {i}?'; I see 1 picture(s)" in answers[g], answers[g]
            # Exactly one reply: the other process never saw the mention.
            assert len(emulator.bot_messages(channel, include_deleted=True)) == 1
            answered_by = [s for s, p in enumerate(processes) if f"Answered in channel {channel}:" in p.log()]
            assert answered_by == [owner[g]], f"guild {g} of shard {owner[g]}: {answered_by}"
        assert await stored_turns(database_url, list(channels.values())) == {
            c: ["user", "assistant"] for c in channels.values()
        }
    finally:
        codes = await asyncio.gather(*(p.stop() for p in processes))
        for process in processes:
            await process.__aexit__(None, None, None)
    assert codes == [0, 0], "\n".join(p.log() for p in processes)
    for process in processes:
        assert "Traceback" not in process.log(), process.log()
