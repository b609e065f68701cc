"""Two real `llava-bot run` processes (shards 0 and 1 of two) on one SQLite file: a start leaves alone the reply
that the other, live process is writing, and closes it with a sentence once that process has been killed.

The scripted engine answers (tests/support/scripted.py): what is tested is whose reply it is, not what it says.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from bot.cogs.recovery import CUT_OFF
from bot.store import ReplyStore, open_database, session_factory
from tests.e2e.bot_process import BotProcess
from tests.e2e.discord_emulator import DiscordEmulator, MessageRecord, shard_of
from tests.e2e.helpers import MARKER, answer_messages, png, text_of
from tests.e2e.test_lifecycle import CUT_OFF_LINE, closing_of, streaming
from tests.e2e.test_stopping import wait_log

pytestmark = pytest.mark.asyncio(loop_scope="session")

# The answer is written a word every PACE seconds and then held for good after HOLD_AFTER words (REPEAT makes it
# that long): it grows whenever its process runs, for a minute of running, far more than the test lets it run
# between its signals, and it is still open when the test kills its process.
PACE = 0.1
HOLD_AFTER = 600
REPEAT = 60
LONG = 1800


def shard_config(shard: int, database_url: str) -> dict[str, dict[str, Any]]:
    return {
        # The survivor looks for replies of ended processes this often (10 s by default).
        "discord": {"shard_count": 2, "shard_ids": [shard], "recovery_interval": 0.5},
        "model": {
            "engine": "scripted",
            "max_new_tokens": LONG,
            "ov_config": {"pace": str(PACE), "hold_after": str(HOLD_AFTER), "repeat": str(REPEAT)},
        },
        "database": {"url": database_url},
    }


async def open_reply_owners(database_url: str) -> list[str | None]:
    engine = open_database(database_url)
    try:
        return [reply.owner for reply in await ReplyStore(session_factory(engine)).open_replies()]
    finally:
        await engine.dispose()


async def test_a_start_leaves_a_live_process_reply_alone_and_a_survivor_closes_it_once_killed(
    tmp_path: Path, emulator: DiscordEmulator
) -> None:
    people = [emulator.user, emulator.other_user, emulator.admin]
    guild = emulator.add_guild("On shard 0", guild_id=emulator.snowflake_on_shard(0, 2), members=people)
    assert shard_of(guild.id, 2) == 0
    channel = guild.system_channel_id
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'shared.sqlite3'}"
    writer, starter = (
        BotProcess(emulator, tmp_path / "no-model", tmp_path / f"shard{s}", shard_config(s, database_url))
        for s in (0, 1)
    )
    try:
        await writer.start()
        asked = await emulator.user_message(
            channel, emulator.user, "What is this?", attachments=[("photo.png", png(seed=9), "image/png")]
        )
        await emulator.wait_for(lambda: streaming(answer_messages(emulator, asked)), 120)
        # Frozen mid-answer, the writer is still alive: its reply stays open and its process exists.
        writer.signal(signal.SIGSTOP)
        await emulator.wait_quiet(0.5, 30)
        shown = text_of(answer_messages(emulator, asked))
        reply_ids = {m.id for m in answer_messages(emulator, asked)}
        started_at = len(emulator.requests)

        await starter.start()
        await wait_log(starter, "Leaving 1 open replies to the running processes writing them")
        await emulator.wait_quiet(0.5, 30)
        assert text_of(answer_messages(emulator, asked)) == shown
        touched = [r for r in emulator.requests[started_at:] if any(str(i) in r.path for i in reply_ids)]
        assert touched == [], "the starting process edited the other process's reply"

        # The writer goes on with its answer: the reply is still its own.
        writer.signal(signal.SIGCONT)
        await emulator.wait_for(lambda: len(text_of(answer_messages(emulator, asked))) > len(shown) or None, 60)
        writer.signal(signal.SIGSTOP)
        await emulator.wait_quiet(0.5, 30)
        assert streaming(answer_messages(emulator, asked)), "the answer ended before the test could kill its process"
        [owner] = await open_reply_owners(database_url)
        assert owner is not None and f":{writer.pid}:" in owner
        cut_at = text_of(answer_messages(emulator, asked))

        writer.signal(signal.SIGKILL)
        assert await writer.wait_exit(30) == -signal.SIGKILL
        # The survivor notices within its next look and closes the reply with the sentence.
        await wait_log(starter, "1 replies were left unfinished by processes that ended", timeout=60)

        def closed_reply() -> list[MessageRecord] | None:
            messages = answer_messages(emulator, asked)
            return messages if messages and MARKER not in closing_of(emulator, messages) else None

        closed = await emulator.wait_for(closed_reply, 30)
        shown_then = cut_at.removesuffix(" " + MARKER)
        assert closing_of(emulator, closed) in (shown_then + CUT_OFF_LINE, shown_then + CUT_OFF_LINE.lstrip())
        assert CUT_OFF in closing_of(emulator, closed)
        await emulator.wait_for(lambda: "Closed message" in starter.log() or None, 10)
        assert await open_reply_owners(database_url) == []
    finally:
        if writer.process is not None and writer.process.returncode is None:
            writer.signal(signal.SIGCONT)  # a frozen process would not hear the SIGINT that stops it
        codes = await asyncio.gather(writer.stop(), starter.stop())
        for process in (writer, starter):
            await process.__aexit__(None, None, None)
    assert codes[1] == 0, starter.log()
    assert "Traceback" not in starter.log(), starter.log()
