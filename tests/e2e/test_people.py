"""People and their data, end to end (the scripted engine answers): /forget, retention, the rate limit, allow
and deny lists, DMs."""

from __future__ import annotations

import re
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from bot.config import Config
from bot.store import HistoryStore, StoredImage, open_database, session_factory, upgrade
from bot.store.tables import ImageRow, TurnRow
from tests.e2e.conftest import llava_bot
from tests.e2e.discord_emulator import JSON, DiscordEmulator, EmulatedUser, MessageRecord
from tests.e2e.helpers import png, replies_to, text_of, unanswered, wait_answer, wait_response

pytestmark = pytest.mark.asyncio(loop_scope="session")


# --- looking into the bot's SQLite file -------------------------------------------------------------
def database(config: Config) -> Path:
    return Path(config.database.url.removeprefix("sqlite+aiosqlite:///"))


def rows(config: Config, sql: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(database(config)) as connection:
        return connection.execute(sql, params).fetchall()


def turns_of(config: Config, author: EmulatedUser) -> list[str]:
    return [str(r[0]) for r in rows(config, "SELECT text FROM turns WHERE author_id = ? ORDER BY id", author.id)]


def all_turns(config: Config) -> list[tuple[str, str]]:
    return [(str(role), str(text)) for role, text in rows(config, "SELECT role, text FROM turns ORDER BY id")]


def image_count(config: Config) -> int:
    return int(rows(config, "SELECT count(*) FROM images")[0][0])  # type: ignore[call-overload]


def linked(config: Config, message_id: int) -> bool:
    return bool(rows(config, "SELECT 1 FROM turn_messages WHERE message_id = ?", message_id))


# --- asking -----------------------------------------------------------------------------------------
async def ask(emulator: DiscordEmulator, channel: int, user: EmulatedUser, words: str, seed: int | None = None) -> JSON:
    """A mention (with an image when ``seed`` is given), answered completely."""
    attachments = [(f"{seed}.png", png(seed=seed), "image/png")] if seed is not None else []
    asked = await emulator.user_message(channel, user, words, attachments=attachments)
    await wait_answer(emulator, asked)
    return asked


async def forget_prompt(emulator: DiscordEmulator, user: EmulatedUser, channel: int) -> MessageRecord:
    """Run /forget and return the ephemeral question with its buttons."""
    interaction = await emulator.slash_command("forget", user=user, channel_id=channel)
    [message] = await wait_response(emulator, interaction, quiet=0.3)
    assert emulator.interaction_responses(interaction).ephemeral
    buttons = [c["custom_id"] for row in message.data["components"] for c in row["components"]]
    assert buttons == ["forget:confirm", "forget:cancel"]
    return message


async def press(emulator: DiscordEmulator, message: MessageRecord, button: str, user: EmulatedUser) -> None:
    before = len(message.history)
    await emulator.component_interaction(message, button, user=user)
    await emulator.wait_for(lambda: len(message.history) > before)


# --- /forget ----------------------------------------------------------------------------------------
async def test_forget_deletes_a_persons_data_in_every_channel_after_confirming(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    alice, bob = emulator.user, emulator.other_user
    dm = emulator.dm_channel(alice)
    async with llava_bot(scripted_config, emulator):
        mine = await ask(emulator, emulator.channel_id, alice, "What is this?", seed=1)
        theirs = await ask(emulator, emulator.channel_id, bob, "And this?", seed=2)
        in_dm = await ask(emulator, dm, alice, "Describe it.", seed=3)
        assert (
            turns_of(scripted_config, alice) == ["What is this?", "Describe it."] and image_count(scripted_config) == 3
        )
        prompt = await forget_prompt(emulator, alice, emulator.second_channel_id)
        await press(emulator, prompt, "forget:confirm", alice)
        answers = [r.id for m in (mine, in_dm) for r in replies_to(emulator, int(m["id"]))]

        assert prompt.content == "Done: I deleted 2 questions, 2 answers and 2 images."
        assert prompt.data["components"] == []
        assert turns_of(scripted_config, alice) == []
        assert [role for role, _ in all_turns(scripted_config)] == ["user", "assistant"], "bob's question and answer"
        assert turns_of(scripted_config, bob) == ["And this?"]
        assert image_count(scripted_config) == 1
        assert not any(linked(scripted_config, i) for i in [int(mine["id"]), int(in_dm["id"]), *answers])
        assert linked(scripted_config, int(theirs["id"]))
        # The channel's conversation goes on without alice's part.
        again = await emulator.user_message(emulator.channel_id, alice, "What colour is it?")
        await wait_answer(emulator, again)
        assert turns_of(scripted_config, alice) == ["What colour is it?"]


async def test_cancel_or_no_answer_keeps_everything(scripted_config: Config, emulator: DiscordEmulator) -> None:
    alice, bob = emulator.user, emulator.other_user
    async with llava_bot(scripted_config, emulator) as bot:
        await ask(emulator, emulator.channel_id, alice, "What is this?", seed=4)
        before = all_turns(scripted_config)
        prompt = await forget_prompt(emulator, alice, emulator.channel_id)

        stranger = await emulator.component_interaction(prompt, "forget:confirm", user=bob)
        [refused] = await wait_response(emulator, stranger, quiet=0.3)
        assert refused.content == "Only the person who used /forget can answer this."
        assert all_turns(scripted_config) == before

        await press(emulator, prompt, "forget:cancel", alice)
        assert prompt.content == "Cancelled: nothing was deleted." and prompt.data["components"] == []
        assert all_turns(scripted_config) == before and image_count(scripted_config) == 1

        bot.get_cog("PrivacyCog").confirm_timeout = 0.5  # type: ignore[union-attr]
        ignored = await emulator.slash_command("forget", user=alice, channel_id=emulator.channel_id)
        closed = await emulator.wait_for(
            lambda: next((m for m in emulator.interaction_responses(ignored).messages if len(m.history) > 1), None)
        )
        assert closed.history[0].startswith("This deletes everything I have stored from you")
        assert closed.content == "No answer within 0.5 seconds, so nothing was deleted."
        assert closed.data["components"] == []
        assert all_turns(scripted_config) == before and image_count(scripted_config) == 1


async def test_forget_in_a_dm(scripted_config: Config, emulator: DiscordEmulator) -> None:
    alice = emulator.user
    dm = emulator.dm_channel(alice)
    async with llava_bot(scripted_config, emulator):
        await ask(emulator, dm, alice, "What is this?", seed=5)
        await ask(emulator, emulator.channel_id, alice, "Tell me a story.")
        prompt = await forget_prompt(emulator, alice, dm)
        await press(emulator, prompt, "forget:confirm", alice)
        assert prompt.content == "Done: I deleted 2 questions, 2 answers and 1 image."
        assert all_turns(scripted_config) == [] and image_count(scripted_config) == 0

        second = await forget_prompt(emulator, alice, dm)
        await press(emulator, second, "forget:confirm", alice)
        assert second.content == "There was nothing stored from you, so nothing was deleted."


# --- retention --------------------------------------------------------------------------------------
def picture(tag: bytes) -> StoredImage:
    return StoredImage(data=png(seed=len(tag)) + tag, mime="image/png", width=120, height=90)


async def stored_long_ago(url: str, channel: int, words: str, image: StoredImage | None, days: float) -> None:
    """A question and its answer as if asked ``days`` ago (rows written with an old created_at)."""
    engine = open_database(url)
    try:
        store = HistoryStore(session_factory(engine))
        question = await store.add_user_turn(channel, words, author_id=1, author_name="old", image=image)
        answer = await store.add_assistant_turn(channel, f"answer to {words}")
        when = datetime.now(UTC) - timedelta(days=days)
        async with engine.begin() as connection:
            await connection.execute(update(TurnRow).where(TurnRow.id.in_([question, answer])).values(created_at=when))
            if image is not None:
                await connection.execute(
                    update(ImageRow).where(ImageRow.sha256 == image.sha256).values(created_at=when)
                )
    finally:
        await engine.dispose()


async def test_retention_deletes_old_turns_and_orphaned_images(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    url = scripted_config.database.url
    await upgrade(url)
    old, kept = picture(b"old"), picture(b"kept")
    await stored_long_ago(url, emulator.channel_id, "very old", old, days=45)
    await stored_long_ago(url, emulator.second_channel_id, "recent", kept, days=2)
    scripted_config.chat.retention_days = 30
    async with llava_bot(scripted_config, emulator):
        await emulator.wait_for(lambda: len(all_turns(scripted_config)) == 2)
        assert all_turns(scripted_config) == [("user", "recent"), ("assistant", "answer to recent")]
        assert [r[0] for r in rows(scripted_config, "SELECT sha256 FROM images")] == [kept.sha256]
        # The channel whose conversation expired starts afresh; new questions are kept.
        asked = await ask(emulator, emulator.channel_id, emulator.user, "What is this?", seed=6)
        assert ("user", "What is this?") in all_turns(scripted_config) and image_count(scripted_config) == 2
        assert linked(scripted_config, int(asked["id"]))


# --- rate limit -------------------------------------------------------------------------------------
async def test_the_question_over_the_rate_limit_is_told_when_and_not_downloaded(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    scripted_config.chat.rate_limit = "2/10m"
    alice, bob = emulator.user, emulator.other_user
    async with llava_bot(scripted_config, emulator):
        started = time.time()
        for seed in (7, 8):
            await ask(emulator, emulator.channel_id, alice, "What is this?", seed=seed)
        finished = time.time()
        over = await emulator.user_message(
            emulator.channel_id, alice, "And this?", attachments=[("9.png", png(seed=9), "image/png")]
        )
        reply = await emulator.wait_for(lambda: replies_to(emulator, int(over["id"])))
        again = await emulator.user_message(emulator.second_channel_id, alice, "Hello?")
        interaction = await emulator.slash_command("ask", {"question": "Please?"}, user=alice)
        [ephemeral] = await wait_response(emulator, interaction, quiet=0.3)
        await ask(emulator, emulator.second_channel_id, bob, "What is this?", seed=10)
        assert await unanswered(emulator, again)

    match = re.fullmatch(
        r"You've reached the limit of 2 questions per 10 minutes\. You can ask again <t:(\d+):R>\.", reply[0].content
    )
    assert match is not None, reply[0].content
    # The first question leaves the ten-minute window ten minutes after it was asked.
    assert started + 600 <= int(match.group(1)) <= finished + 601
    assert ephemeral.content == reply[0].content and emulator.interaction_responses(interaction).ephemeral
    assert int(over["attachments"][0]["id"]) not in emulator.downloads
    assert len(emulator.downloads) == 3, "alice's two questions and bob's were downloaded"
    assert turns_of(scripted_config, alice) == ["What is this?", "What is this?"]
    assert turns_of(scripted_config, bob) == ["What is this?"]


# --- who may ask --------------------------------------------------------------------------------------
async def test_allow_and_deny_lists(scripted_config: Config, emulator: DiscordEmulator) -> None:
    alice, bob = emulator.user, emulator.other_user
    scripted_config.discord.allowed_channel_ids = [emulator.channel_id]
    scripted_config.discord.denied_user_ids = [bob.id]
    async with llava_bot(scripted_config, emulator):
        in_thread = await ask(emulator, emulator.thread_id, alice, "What is this?", seed=11)
        in_channel = await ask(emulator, emulator.channel_id, alice, "Tell me a story.")
        elsewhere = await emulator.user_message(emulator.second_channel_id, alice, "Hello?")
        denied = await emulator.user_message(
            emulator.channel_id, bob, "What is this?", attachments=[("b.png", png(seed=12), "image/png")]
        )
        assert await unanswered(emulator, elsewhere, denied)
        interaction = await emulator.slash_command("ask", {"question": "Please?"}, user=bob)
        [refused] = await wait_response(emulator, interaction, quiet=0.3)

    assert text_of(replies_to(emulator, int(in_thread["id"]))), "a thread counts as its allowed parent channel"
    assert text_of(replies_to(emulator, int(in_channel["id"])))
    assert refused.content == ("I don't take questions here: the people who run me chose where and from whom I answer.")
    assert emulator.interaction_responses(interaction).ephemeral
    assert int(denied["attachments"][0]["id"]) not in emulator.downloads
    assert turns_of(scripted_config, bob) == []


async def test_an_allowed_role(scripted_config: Config, emulator: DiscordEmulator) -> None:
    scripted_config.discord.allowed_role_ids = [emulator.admin_role_id]
    async with llava_bot(scripted_config, emulator):
        admitted = await ask(emulator, emulator.channel_id, emulator.admin, "Tell me a story.")
        outsider = await emulator.user_message(emulator.channel_id, emulator.user, "Tell me a story.")
        assert await unanswered(emulator, outsider)
    assert text_of(replies_to(emulator, int(admitted["id"])))


async def test_ask_in_a_dm_follows_answer_dms(scripted_config: Config, emulator: DiscordEmulator) -> None:
    scripted_config.discord.answer_dms = False
    alice = emulator.user
    dm = emulator.dm_channel(alice)
    async with llava_bot(scripted_config, emulator):
        interaction = await emulator.slash_command("ask", {"question": "Hello?"}, user=alice, channel_id=dm)
        [refused] = await wait_response(emulator, interaction, quiet=0.3)
        mention = await emulator.user_message(dm, alice, "Hello?")
        assert await unanswered(emulator, mention)
        in_server = await emulator.slash_command("ask", {"question": "Hello?"}, user=alice)
        answered = await wait_response(emulator, in_server)
    responses = emulator.interaction_responses(interaction)
    assert refused.content == "I don't answer direct messages; please ask me in a server."
    assert responses.ephemeral and not responses.deferred
    assert text_of(answered) and emulator.interaction_responses(in_server).deferred
    assert all_turns(scripted_config)[0] == ("user", "Hello?") and len(all_turns(scripted_config)) == 2
