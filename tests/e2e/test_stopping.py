"""Stopping an answer, through the real `llava-bot run`: the Stop button, a deleted reply, a deleted question.

One bot process (continuous batching, the tiny model, answers far longer than any test waits) serves every
test of this module. Each test ends the answers it started, so the next one finds the bot idle.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.chat.images import ImageLimits, load_image
from bot.chat.scheduler import ALREADY_ASKING
from bot.chat.stopping import QUESTION_DELETED_NOTE, STOPPED_NOTE
from bot.cogs.stopping import NOT_YOURS, STOP_ID
from tests.e2e.bot_process import BotProcess
from tests.e2e.discord_emulator import (
    FLAG_EPHEMERAL,
    JSON,
    DiscordEmulator,
    EmulatedUser,
    InteractionRecord,
    MessageRecord,
)
from tests.e2e.helpers import MARKER, png, replies_to, text_of

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Longer than any test waits for: an answer is always still being written when the test acts on it.
LONG_ANSWER = 1800


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def emulator() -> AsyncIterator[DiscordEmulator]:
    """One emulated Discord for the module's bot process."""
    async with DiscordEmulator() as emu:
        yield emu


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def bot(
    emulator: DiscordEmulator, tiny_llava: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BotProcess]:
    """The real bot, answering with the tiny model through the default engine, shared by the module."""
    config: dict[str, dict[str, Any]] = {
        "model": {"engine": "genai-batching", "max_new_tokens": LONG_ANSWER},
        "discord": {"admin_ids": [emulator.admin.id]},
    }
    async with BotProcess(emulator, tiny_llava[1], tmp_path_factory.mktemp("stopping"), config) as process:
        yield process
    # Stopping and deleting are ordinary events: none of them may end in a traceback.
    assert "Traceback" not in process.log(), process.log()[-5000:]


# --- helpers ---------------------------------------------------------------------------------------
def reply_to(emulator: DiscordEmulator, asked: JSON) -> MessageRecord | None:
    replies = replies_to(emulator, int(asked["id"]))
    return replies[0] if replies else None


def parts(emulator: DiscordEmulator, first: MessageRecord) -> list[MessageRecord]:
    """The messages of the answer that begins with ``first`` (a long answer continues in new messages).

    Tests here run one answer at a time, so every later public bot message of the channel belongs to it.
    """
    return [
        m
        for m in emulator.bot_messages(first.channel_id, include_deleted=True)
        if m.id >= first.id and not m.flags & FLAG_EPHEMERAL
    ]


def live(emulator: DiscordEmulator, first: MessageRecord) -> MessageRecord | None:
    """The message of the answer being written: text still growing, under a Stop button."""
    growing = [m for m in parts(emulator, first) if not m.deleted and m.content.endswith(MARKER)]
    return growing[-1] if growing and stop_buttons(growing[-1]) else None


def stop_buttons(message: MessageRecord) -> list[JSON]:
    return [b for b in message.buttons if b.get("custom_id") == STOP_ID]


def ended_with(emulator: DiscordEmulator, first: MessageRecord, note: str) -> bool:
    """The answer ended with ``note`` and no message of it shows a Stop button any more."""
    shown = [m for m in parts(emulator, first) if not m.deleted]
    return bool(shown) and shown[-1].content.endswith(note) and not any(m.buttons for m in shown)


async def ask_until_streaming(
    emulator: DiscordEmulator, person: EmulatedUser, seed: int, question: str = "What is in this picture?"
) -> tuple[JSON, MessageRecord]:
    """Ask about a new picture and wait until the answer is being written; returns (question, reply)."""
    upload = png(seed=seed)
    asked = await emulator.user_message(
        emulator.channel_id, person, question, attachments=[("p.png", upload, "image/png")]
    )
    reply = await emulator.wait_for(lambda: (r := reply_to(emulator, asked)) and live(emulator, r) and r, 120)
    return asked, reply


async def wait_log(bot: BotProcess, fragment: str, timeout: float = 30) -> float:  # noqa: ASYNC109
    """Wait until the bot logs ``fragment``; returns when that was seen (monotonic clock)."""
    deadline = time.monotonic() + timeout
    while fragment not in bot.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"the bot never logged {fragment!r}:\n{bot.log()[-3000:]}")
        await asyncio.sleep(0.05)
    return time.monotonic()


async def stop_with_button(emulator: DiscordEmulator, first: MessageRecord, person: EmulatedUser) -> InteractionRecord:
    """Press Stop on the answer as ``person`` and wait for the reply to end with the "stopped" note."""
    message = live(emulator, first)
    assert message is not None, "the answer is not being written any more"
    click = await emulator.component_interaction(message, STOP_ID, user=person)
    try:
        await emulator.wait_for(lambda: ended_with(emulator, first, STOPPED_NOTE), 30)
    except TimeoutError:
        raise AssertionError(f"not stopped: {message.content[-100:]!r} {click.callbacks}") from None
    return click


async def answering(emulator: DiscordEmulator, person: EmulatedUser) -> int:
    """How many answers /status says are being written."""
    status = await emulator.slash_command("status", user=person)
    await emulator.wait_for(lambda: emulator.interaction_responses(status).contents, 10)
    found = re.search(r"(\d+) answering", emulator.interaction_responses(status).contents[0])
    assert found is not None
    return int(found.group(1))


async def can_ask_again(emulator: DiscordEmulator, person: EmulatedUser, seed: int) -> None:
    """The person's next question is answered (their earlier answer freed its slot and their lock)."""
    _, reply = await ask_until_streaming(emulator, person, seed)
    assert ALREADY_ASKING not in reply.content
    await stop_with_button(emulator, reply, person)


def edits_of(emulator: DiscordEmulator, message: MessageRecord) -> list[float]:
    path = f"/channels/{message.channel_id}/messages/{message.id}"
    return [r.at for r in emulator.requests if r.method == "PATCH" and r.path == path]


def stored(bot: BotProcess, query: str, *args: object) -> list[tuple[object, ...]]:
    database = bot.data_dir / "bot.sqlite3"
    with sqlite3.connect(database) as connection:
        return connection.execute(query, args).fetchall()


def image_sha(upload: bytes) -> str:
    """The SHA-256 the bot stores the picture of ``upload`` under."""
    return load_image(upload, ImageLimits()).sha256


# --- the Stop button -------------------------------------------------------------------------------
async def test_the_asker_stops_an_answer_with_its_button(emulator: DiscordEmulator, bot: BotProcess) -> None:
    _, reply = await ask_until_streaming(emulator, emulator.user, seed=1)
    writing = live(emulator, reply)
    assert writing is not None and [b["label"] for b in stop_buttons(writing)] == ["Stop"]
    click = await stop_with_button(emulator, reply, emulator.user)
    assert emulator.interaction_responses(click).deferred
    shown = [m.content for m in parts(emulator, reply)]
    assert not any(MARKER in content for content in shown)
    # Generation ended: the reply no longer changes, and the bot is idle again.
    await emulator.wait_quiet(1.0, 30)
    assert [m.content for m in parts(emulator, reply)] == shown
    assert await answering(emulator, emulator.user) == 0
    # The button was there while the answer was written, and every message of it ends without one.
    assert reply.component_history[0]
    assert all(m.component_history[-1] == [] for m in parts(emulator, reply))
    await can_ask_again(emulator, emulator.user, seed=2)


async def test_a_stop_by_someone_else_is_refused_and_the_answer_goes_on(
    emulator: DiscordEmulator, bot: BotProcess
) -> None:
    _, reply = await ask_until_streaming(emulator, emulator.user, seed=3)
    writing = live(emulator, reply)
    assert writing is not None
    click = await emulator.component_interaction(writing, STOP_ID, user=emulator.other_user)
    await emulator.wait_for(lambda: emulator.interaction_responses(click).contents, 10)
    refusal = emulator.interaction_responses(click)
    assert refusal.ephemeral and refusal.contents == [NOT_YOURS]
    seen = text_of(parts(emulator, reply))
    await emulator.wait_for(lambda: len(text_of(parts(emulator, reply))) > len(seen) + 50, 30)
    assert live(emulator, reply) is not None
    # An admin may stop anyone's answer.
    await stop_with_button(emulator, reply, emulator.admin)


async def test_an_ask_command_response_has_the_stop_button_too(emulator: DiscordEmulator, bot: BotProcess) -> None:
    ask = await emulator.slash_command(
        "ask",
        {"question": "What is this?"},
        user=emulator.other_user,
        attachments={"image": ("a.png", png(4), "image/png")},
    )

    def first_streaming() -> MessageRecord | None:
        messages = emulator.interaction_responses(ask).messages
        return messages[0] if messages and live(emulator, messages[0]) else None

    reply = await emulator.wait_for(first_streaming, 120)
    await stop_with_button(emulator, reply, emulator.other_user)
    assert all(MARKER not in m.content for m in emulator.interaction_responses(ask).messages)


class PressAtOnce:
    """Presses Stop on the first reply message to carry the button, the instant the bot has posted it."""

    def __init__(self, emulator: DiscordEmulator, person: EmulatedUser) -> None:
        self.emulator, self.person = emulator, person
        self.pressed: MessageRecord | None = None
        self.click: asyncio.Task[InteractionRecord] | None = None

    def __call__(self, record: MessageRecord) -> None:
        if self.pressed is None and stop_buttons(record):
            self.pressed = record
            self.click = asyncio.create_task(self.emulator.component_interaction(record, STOP_ID, user=self.person))

    def __enter__(self) -> PressAtOnce:
        self.emulator.bot_writes.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.emulator.bot_writes.remove(self)


async def stopped_at_once(emulator: DiscordEmulator, bot: BotProcess, press: PressAtOnce) -> None:
    """The press found the answer: the reply says it was stopped, and the button did not count as stale."""
    await emulator.wait_for(lambda: press.click is not None and press.click.done(), 60)
    assert press.pressed is not None and press.click is not None
    first, click = press.pressed, press.click.result()
    # Stopped before it could write a word: the reply is just the note, without the button.
    await emulator.wait_for(lambda: (first.content == STOPPED_NOTE.strip() and not first.buttons) or None, 30)
    assert emulator.interaction_responses(click).deferred
    assert f"Stop pressed on message {first.id}, whose answer has ended" not in bot.log()
    assert all(m.content == STOPPED_NOTE.strip() for m in parts(emulator, first))


async def test_a_stop_pressed_the_moment_the_reply_appears_stops_the_answer(
    emulator: DiscordEmulator, bot: BotProcess
) -> None:
    with PressAtOnce(emulator, emulator.user) as press:
        asked = await emulator.user_message(
            emulator.channel_id, emulator.user, "What is this?", attachments=[("p.png", png(seed=21), "image/png")]
        )
        await stopped_at_once(emulator, bot, press)
    assert press.pressed is not None and press.pressed.reference_id == int(asked["id"])
    await can_ask_again(emulator, emulator.user, seed=22)


async def test_a_stop_pressed_the_moment_an_ask_response_appears_stops_the_answer(
    emulator: DiscordEmulator, bot: BotProcess
) -> None:
    with PressAtOnce(emulator, emulator.other_user) as press:
        ask = await emulator.slash_command(
            "ask",
            {"question": "What is this?"},
            user=emulator.other_user,
            attachments={"image": ("a.png", png(23), "image/png")},
        )
        await stopped_at_once(emulator, bot, press)
    assert press.pressed is not None and press.pressed.interaction_id == ask.id


# --- deleting ---------------------------------------------------------------------------------------
async def test_deleting_the_reply_stops_the_answer(emulator: DiscordEmulator, bot: BotProcess) -> None:
    asked, reply = await ask_until_streaming(emulator, emulator.user, seed=5)
    writing = live(emulator, reply)
    assert writing is not None
    # A moderator deletes the bot's reply while it is being written.
    await emulator.delete_message(writing, by=emulator.admin)
    seen = await wait_log(bot, f"Answer to {asked['id']} in channel {emulator.channel_id} stopped: reply deleted")
    # The same person's next question is answered at once: the slot and their lock are free.
    await can_ask_again(emulator, emulator.user, seed=6)
    await asyncio.sleep(max(0.0, seen + 2.5 - time.monotonic()))
    late = [at for at in edits_of(emulator, writing) if at > seen + 2]
    assert late == [], "the bot kept editing a deleted message"
    assert sum(r.status == 404 for r in emulator.requests if str(writing.id) in r.path) <= 1
    # With its answer deleted, the exchange is left out of the conversation.
    assert stored(bot, "SELECT turn_id FROM turn_messages WHERE message_id = ?", int(asked["id"])) == []


async def test_deleting_the_question_stops_the_answer_and_forgets_it(
    emulator: DiscordEmulator, bot: BotProcess
) -> None:
    asked, reply = await ask_until_streaming(emulator, emulator.other_user, seed=7, question="And this one?")
    sha = image_sha(png(seed=7))
    assert stored(bot, "SELECT 1 FROM images WHERE sha256 = ?", sha) == [(1,)]
    await emulator.delete_message(asked, by=emulator.other_user)
    await wait_log(bot, f"Answer to {asked['id']} in channel {emulator.channel_id} stopped: question deleted")
    await emulator.wait_for(lambda: ended_with(emulator, reply, QUESTION_DELETED_NOTE), 30)
    await emulator.wait_quiet(1.0, 30)
    assert await answering(emulator, emulator.other_user) == 0
    await emulator.wait_for(lambda: not stored(bot, "SELECT 1 FROM images WHERE sha256 = ?", sha), 30)
    assert stored(bot, "SELECT turn_id FROM turn_messages WHERE message_id = ?", int(asked["id"])) == []
    await can_ask_again(emulator, emulator.other_user, seed=8)


async def test_deleting_an_answered_question_forgets_it_and_its_answer(
    emulator: DiscordEmulator, bot: BotProcess
) -> None:
    asked, reply = await ask_until_streaming(emulator, emulator.owner, seed=9)
    await stop_with_button(emulator, reply, emulator.owner)
    # Stopped by the asker, the exchange is kept: the question and the text written so far.
    await emulator.wait_for(lambda: stored(bot, "SELECT 1 FROM turn_messages WHERE message_id = ?", reply.id), 30)
    question_turn = stored(bot, "SELECT turn_id FROM turn_messages WHERE message_id = ?", int(asked["id"]))
    answer_turn = stored(bot, "SELECT turn_id FROM turn_messages WHERE message_id = ?", reply.id)
    assert question_turn and answer_turn
    await emulator.delete_message(asked, by=emulator.owner)
    await wait_log(bot, f"Question {asked['id']} was deleted: 2 turns forgotten")
    assert stored(bot, "SELECT id FROM turns WHERE id IN (?, ?)", question_turn[0][0], answer_turn[0][0]) == []
    assert stored(bot, "SELECT 1 FROM images WHERE sha256 = ?", image_sha(png(seed=9))) == []
    # The reply stays in the channel; the bot just no longer remembers it.
    assert not emulator.messages[reply.id].deleted
