"""Two real `llava-bot run` processes, shard 0 and shard 1 of two, sharing one PostgreSQL database.

The rules that bind one process bind both: a person's second question is refused while their first runs
in the other process, and /forget run in one process keeps the other's answer in progress out of the
history. The bot's essential path (a picture, a follow-up from history, /reset) runs on PostgreSQL too.
The scripted engine answers (tests/support/scripted.py): an answer pauses after a few words while the
test's release file is missing, so the test acts while it is certainly still being written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.chat.scheduler import ALREADY_ASKING
from bot.chat.service import THINKING
from bot.engine.base import Turn
from bot.store.db import open_database, session_factory
from bot.store.history import HistoryStore, StoredTurn
from tests.e2e.bot_process import BotProcess
from tests.e2e.discord_emulator import DiscordEmulator, shard_of
from tests.e2e.helpers import answer_messages, png, seen_by_model, text_of, wait_answer, wait_response
from tests.e2e.test_people import forget_prompt, press
from tests.postgres import PostgresServer
from tests.support.scripted import default_answer

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Answers pause after this many words until the release file exists.
HOLD_AFTER = 3


@dataclass
class Pair:
    emulator: DiscordEmulator
    database_url: str
    processes: list[BotProcess]
    # The "general" channel of a guild that each shard owns.
    channels: dict[int, int]
    # While this file is missing, answers pause after HOLD_AFTER words.
    release: Path


async def turns_in(database_url: str, channel_id: int) -> list[StoredTurn]:
    """The channel's turns as a fresh reader of the shared database sees them."""
    engine = open_database(database_url)
    try:
        return await HistoryStore(session_factory(engine)).turns(channel_id)
    finally:
        await engine.dispose()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pair(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pair]:
    tmp = tmp_path_factory.mktemp("postgres-bots")
    release = tmp / "release"
    release.touch()
    database_url = await postgres.new_database()
    async with DiscordEmulator() as emulator:
        people = [emulator.user, emulator.other_user, emulator.admin]
        channels: dict[int, int] = {}
        for shard in (0, 1):
            guild = emulator.add_guild(
                f"On shard {shard}", guild_id=emulator.snowflake_on_shard(shard, 2), members=people
            )
            assert shard_of(guild.id, 2) == shard
            channels[shard] = guild.system_channel_id
        scripted = {"hold_after": str(HOLD_AFTER), "release_file": str(release)}
        config: dict[str, dict[str, Any]] = {"model": {"engine": "scripted", "ov_config": scripted}}
        processes = []
        for shard in (0, 1):
            tables = {**config, "discord": {"shard_count": 2, "shard_ids": [shard]}, "database": {"url": database_url}}
            processes.append(BotProcess(emulator, tmp / "no-model", tmp / f"shard{shard}", tables))
        try:
            # One after the other: the first start migrates the shared database.
            for process in processes:
                await process.start()
            await emulator.wait_for(lambda: emulator.connected_shards == {(0, 2), (1, 2)}, 60)
            yield Pair(emulator, database_url, processes, channels, release)
        finally:
            codes = [await p.stop() for p in processes]
            for process in processes:
                await process.__aexit__(None, None, None)
        assert codes == [0, 0], "\n".join(p.log() for p in processes)
        for process in processes:
            assert "Traceback" not in process.log(), process.log()


async def writing(emulator: DiscordEmulator, asked: dict[str, Any]) -> None:
    """Wait until the answer to ``asked`` has started to stream (its reply shows model text)."""

    def started() -> bool | None:
        text = text_of(answer_messages(emulator, asked))
        return (bool(text.strip()) and not text.startswith(THINKING[:1])) or None

    await emulator.wait_for(started, 120)


async def test_the_essential_path_on_postgresql(pair: Pair) -> None:
    emulator, bob, channel = pair.emulator, pair.emulator.other_user, pair.channels[0]
    first = await emulator.user_message(
        channel, bob, "What is in this picture?", attachments=[("a.png", png(seed=3), "image/png")]
    )
    picture = [Turn("user", "What is in this picture?", (seen_by_model(png(seed=3)),))]
    assert text_of(await wait_answer(emulator, first, within=180)) == default_answer(picture)
    # No picture this time: the answer has to come from the stored conversation (the picture included).
    follow_up = await emulator.user_message(channel, bob, "And what colour is it?")
    conversation = [*picture, Turn("assistant", "..."), Turn("user", "And what colour is it?")]
    assert text_of(await wait_answer(emulator, follow_up, within=180)) == default_answer(conversation)
    stored = await turns_in(pair.database_url, channel)
    assert [(t.role, t.text) for t in stored][::2] == [
        ("user", "What is in this picture?"),
        ("user", "And what colour is it?"),
    ]
    assert [t.role for t in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[0].image_sha256 is not None
    assert "Answered in channel" in pair.processes[0].log()

    reset = await emulator.slash_command("reset", user=emulator.admin, channel_id=channel)
    [reply] = await wait_response(emulator, reset, quiet=0.3)
    assert reply.content == "Done: I forgot this channel's conversation (4 messages)."
    assert await turns_in(pair.database_url, channel) == []


async def test_one_question_per_person_and_forget_hold_across_processes(pair: Pair) -> None:
    emulator, alice = pair.emulator, pair.emulator.user
    pair.release.unlink()  # the first answer stays half-written until the test has acted
    first = await emulator.user_message(
        pair.channels[0], alice, "Tell me everything about it.", attachments=[("b.png", png(seed=4), "image/png")]
    )
    await writing(emulator, first)

    # The other process has never seen alice's question, and still refuses her second one.
    second = await emulator.user_message(pair.channels[1], alice, "And this one?")
    [refusal] = await wait_answer(emulator, second, within=60)
    assert refusal.content == ALREADY_ASKING
    assert text_of(answer_messages(emulator, first)) != ALREADY_ASKING

    # /forget in the other process while the answer is still being written.
    prompt = await forget_prompt(emulator, alice, pair.channels[1])
    await press(emulator, prompt, "forget:confirm", alice)
    assert prompt.content.startswith("Done:"), prompt.content
    pair.release.touch()
    finished = text_of(await wait_answer(emulator, first, within=180))
    assert finished.strip() and finished != ALREADY_ASKING
    assert await turns_in(pair.database_url, pair.channels[0]) == [], "the answer came back after /forget"
    assert "the answer is not kept" in pair.processes[0].log()

    # Her question is over, so the other process takes the next one.
    third = await emulator.user_message(
        pair.channels[1], alice, "What is this?", attachments=[("c.png", png(seed=5), "image/png")]
    )
    answer = text_of(await wait_answer(emulator, third, within=180))
    assert answer.strip() and answer != ALREADY_ASKING
    assert [t.role for t in await turns_in(pair.database_url, pair.channels[1])] == ["user", "assistant"]
