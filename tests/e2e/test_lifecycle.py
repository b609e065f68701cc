"""Deploys and crashes, with the real `llava-bot run`: SIGTERM mid-answer, and kill -9 followed by a restart.

The scripted engine answers (tests/support/scripted.py): what is tested is the bot's process, not the model.
Answers that must still be open when the test strikes are held after a set number of words (``hold_after``), so
they are open on any machine.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.chat.lifecycle import RESTARTING
from bot.chat.streaming import FAILURE_LINE
from bot.cogs.recovery import CUT_OFF
from bot.store import HistoryStore, ReplyStore, StoredReply, StoredTurn, open_database, session_factory
from tests.e2e.bot_process import BotProcess
from tests.e2e.discord_emulator import JSON, DiscordEmulator, InteractionRecord, MessageRecord
from tests.e2e.helpers import MARKER, answer_messages, png, replies_to, text_of, wait_answer, wait_response

pytestmark = pytest.mark.asyncio(loop_scope="session")

RESTART_LINE = FAILURE_LINE.format(sentence=RESTARTING)
CUT_OFF_LINE = FAILURE_LINE.format(sentence=CUT_OFF)
# Before the crash, answers come at once (pace 0) and are held for good after HOLD_AFTER words: the mention's, some
# 64 characters each 12 words, has grown into a second message by then. REPEAT makes the answers that long, LONG
# lets them be.
HOLD_AFTER = 450
REPEAT = 60
LONG = 1800
# The follow-up after a restart need only be answered whole.
SHORT = 32


async def stored(bot: BotProcess) -> tuple[list[StoredReply], Callable[[int], list[StoredTurn]]]:
    """What the bot left in its database: open replies, and each channel's turns."""
    engine = open_database(bot.database_url)
    try:
        sessions = session_factory(engine)
        replies = await ReplyStore(sessions).open_replies()
        history = HistoryStore(sessions)
        turns = {
            channel: await history.turns(channel)
            for channel in (bot.emulator.channel_id, bot.emulator.second_channel_id, bot.emulator.thread_id)
        }
    finally:
        await engine.dispose()
    return replies, lambda channel: turns[channel]


def streaming(messages: list[MessageRecord]) -> bool:
    return bool(messages) and MARKER in messages[-1].content


def response(emulator: DiscordEmulator, interaction: InteractionRecord) -> list[MessageRecord]:
    return emulator.interaction_responses(interaction).messages


async def ask_about_a_picture(emulator: DiscordEmulator) -> JSON:
    return await emulator.user_message(
        emulator.channel_id, emulator.user, "What is this?", attachments=[("photo.png", png(), "image/png")]
    )


def closing_of(emulator: DiscordEmulator, messages: list[MessageRecord]) -> str:
    """A reply's text, with the sentence the bot put in a reply of its own when it no longer fit the message."""
    return text_of(messages) + "".join(m.content for m in replies_to(emulator, messages[-1].id))


# --- SIGTERM ---------------------------------------------------------------------------------------
async def test_sigterm_lets_a_running_answer_finish_and_turns_new_questions_away(
    tmp_path: Path, emulator: DiscordEmulator
) -> None:
    # The scripted engine holds the answer after a few words until the release file appears: it is still being
    # written while the test looks, on any machine.
    release = tmp_path / "release"
    held = {"engine": "scripted", "ov_config": {"hold_after": "3", "release_file": str(release)}}
    config: dict[str, dict[str, Any]] = {"model": held, "discord": {"shutdown_grace": 600.0}}
    async with BotProcess(emulator, tmp_path / "no-model", tmp_path, config) as bot:
        asked = await ask_about_a_picture(emulator)
        await emulator.wait_for(lambda: streaming(answer_messages(emulator, asked)), 120)
        bot.signal(signal.SIGTERM)
        await emulator.wait_for(lambda: "SIGTERM received" in bot.log(), 30)
        # The answer is still being written while the bot already turns new questions away.
        assert streaming(answer_messages(emulator, asked))
        late = await emulator.user_message(emulator.second_channel_id, emulator.other_user, "And what is this?")
        turned_away = await emulator.wait_for(lambda: replies_to(emulator, int(late["id"])), 30)
        interaction = await emulator.slash_command("ask", {"question": "Are you there?"}, user=emulator.admin)
        ask_response = await wait_response(emulator, interaction)
        release.touch()
        answer = await wait_answer(emulator, asked, within=300)
        code = await bot.wait_exit(120)
    log = bot.log()

    assert code == 0, log
    assert "Traceback" not in log
    assert [m.content for m in turned_away] == [RESTARTING]
    assert [m.content for m in ask_response] == [RESTARTING]
    # The running answer was delivered whole: nothing cut off, and it is what the bot stored as finished.
    text = text_of(answer)
    assert "⚠️" not in text
    assert MARKER not in text
    open_replies, turns = await stored(bot)
    assert open_replies == []
    assert [(t.role, t.text) for t in turns(emulator.channel_id)] == [("user", "What is this?"), ("assistant", text)]
    assert turns(emulator.second_channel_id) == []


async def test_sigterm_closes_answers_that_outlast_the_grace_period(tmp_path: Path, emulator: DiscordEmulator) -> None:
    # Both answers pause after a few words and are never released: they outlast any grace period, on any machine.
    held = {"engine": "scripted", "ov_config": {"hold_after": "3", "concurrency": "2"}}
    config: dict[str, dict[str, Any]] = {"model": held, "discord": {"shutdown_grace": 1.0}}
    async with BotProcess(emulator, tmp_path / "no-model", tmp_path, config) as bot:
        asked = await ask_about_a_picture(emulator)
        interaction = await emulator.slash_command(
            "ask", {"question": "Tell me a story."}, user=emulator.other_user, channel_id=emulator.second_channel_id
        )
        await emulator.wait_for(
            lambda: streaming(answer_messages(emulator, asked)) and streaming(response(emulator, interaction)), 120
        )
        await emulator.wait_quiet(0.5, 30)
        shown = {
            "mention": text_of(answer_messages(emulator, asked)),
            "ask": text_of(response(emulator, interaction)),
        }
        bot.signal(signal.SIGTERM)
        mention = await wait_answer(emulator, asked, within=60)
        ask = await wait_response(emulator, interaction, within=60)
        code = await bot.wait_exit(120)
    log = bot.log()

    assert code == 0, log
    assert "Traceback" not in log
    for name, messages in (("mention", mention), ("ask", ask)):
        assert MARKER not in text_of(messages), name
        assert messages[-1].content.endswith(RESTART_LINE), name
        # What the person had already read stays; only the marker gives way to the sentence.
        assert text_of(messages) == shown[name].removesuffix(" " + MARKER) + RESTART_LINE, name
    open_replies, turns = await stored(bot)
    assert open_replies == []
    # The questions are kept (with their image) for follow-ups; the unfinished answers are not.
    assert [t.role for t in turns(emulator.channel_id)] == ["user"]
    assert turns(emulator.channel_id)[0].image_sha256 is not None


async def test_sigterm_while_starting_stops_before_the_bot_goes_online(
    tiny_llava: tuple[Path, Path], tmp_path: Path, emulator: DiscordEmulator
) -> None:
    # Discord is slow to answer the login: the deploy's SIGTERM comes while the bot waits for it.
    login = emulator.hold("/users/@me")
    bot = BotProcess(emulator, tiny_llava[1], tmp_path)
    try:
        await bot.launch()
        await emulator.wait_for(lambda: any(r.path == "/users/@me" for r in emulator.requests), 60)
        bot.signal(signal.SIGTERM)
        await emulator.wait_for(lambda: "SIGTERM received while starting" in bot.log(), 30)
        login.set()
        code = await bot.wait_exit(60)
    finally:
        login.set()
        await bot.stop()
    log = bot.log()

    assert code == 0, log
    assert emulator.identify_count == 0, "the bot went online although it was asked to stop"
    # Nothing slow started either: the model was never loaded.
    assert "Loading" not in log, log
    assert "Traceback" not in log


# --- kill -9, then a restart -----------------------------------------------------------------------
async def test_a_restart_closes_the_replies_a_crash_left_open(tmp_path: Path, emulator: DiscordEmulator) -> None:
    held = {"hold_after": str(HOLD_AFTER), "repeat": str(REPEAT), "concurrency": "3", "pace": "0"}
    config = {"model": {"engine": "scripted", "max_new_tokens": LONG, "ov_config": held}}
    async with BotProcess(emulator, tmp_path / "no-model", tmp_path, config) as bot:
        asked = await ask_about_a_picture(emulator)
        fresh = await emulator.slash_command(
            "ask", {"question": "Tell me a story."}, user=emulator.other_user, channel_id=emulator.second_channel_id
        )
        stale = await emulator.slash_command(
            "ask", {"question": "Tell me another."}, user=emulator.admin, channel_id=emulator.thread_id
        )
        # The mention's answer has grown into a second message; all three are mid-answer, and held there.
        await emulator.wait_for(
            lambda: (
                len(answer_messages(emulator, asked)) >= 2
                and streaming(answer_messages(emulator, asked))
                and streaming(response(emulator, fresh))
                and streaming(response(emulator, stale))
            ),
            180,
        )
        await emulator.wait_quiet(0.5, 30)
        bot.signal(signal.SIGKILL)
        assert await bot.wait_exit(30) == -signal.SIGKILL
        before = {
            "mention": [m.content for m in answer_messages(emulator, asked)],
            "fresh": [m.content for m in response(emulator, fresh)],
            "stale": [m.content for m in response(emulator, stale)],
        }
        assert all(MARKER in contents[-1] for contents in before.values())
        # The crash outlived the second /ask's token: only the channel can reach that response now.
        emulator.expire_interaction_token(stale)
        restarted_at = len(emulator.requests)

        # The restarted bot holds no answer back.
        bot.configure({"model": {"max_new_tokens": SHORT, "ov_config": {}}})
        await bot.start()
        after = {
            "mention": await wait_answer(emulator, asked, within=60),
            "fresh": await wait_response(emulator, fresh, within=60),
            "stale": await wait_response(emulator, stale, within=60),
        }
        for name, messages in after.items():
            # Messages already complete stay as they were; the cut one loses its marker and says why.
            assert [m.content for m in messages[: len(before[name]) - 1]] == before[name][:-1], name
            shown = "".join(before[name]).removesuffix(" " + MARKER)
            assert closing_of(emulator, messages) in (shown + CUT_OFF_LINE, shown + CUT_OFF_LINE.lstrip()), name
            assert MARKER not in closing_of(emulator, messages), name
        edits = [r for r in emulator.requests[restarted_at:] if r.method == "PATCH"]
        assert [r.path.split("/")[1] for r in edits if fresh.token in r.path] == ["webhooks"]
        fresh_id = after["fresh"][len(before["fresh"]) - 1].id
        assert not [r for r in edits if r.path.startswith("/channels/") and r.path.endswith(f"/{fresh_id}")]
        stale_id = after["stale"][len(before["stale"]) - 1].id
        assert [r.path for r in edits if r.path.endswith(f"/{stale_id}")] == [
            f"/channels/{emulator.thread_id}/messages/{stale_id}"
        ]
        await emulator.wait_for(lambda: "3 replies were left unfinished" in bot.log(), 10)

        # The bot answers in the crashed conversation again, about the same picture.
        follow_up = await emulator.user_message(emulator.channel_id, emulator.user, "And what colour is it?")
        answer = await wait_answer(emulator, follow_up, within=300)
        assert MARKER not in text_of(answer)
        assert "⚠️" not in text_of(answer)
        # The engine was asked with the picture from before the crash (its answer counts what it was shown).
        assert "I see 1 picture(s)" in text_of(answer)
        assert await bot.stop() == 0
    log = bot.log()
    assert "Traceback" not in log
    open_replies, turns = await stored(bot)
    assert open_replies == []
    assert [t.role for t in turns(emulator.channel_id)] == ["user", "user", "assistant"]
