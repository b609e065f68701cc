"""Uploads and people's data through the real `llava-bot run`: several attachments, a reply to someone's
picture, a spoiler, the rate limit, retention at start and /forget, all in one bot process.

The scripted engine answers (tests/support/scripted.py): its answer says how many pictures the model was shown.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bot.store import StoredImage, upgrade
from tests.e2e.bot_process import BotProcess
from tests.e2e.discord_emulator import DiscordEmulator, EmulatedUser
from tests.e2e.helpers import jpeg, png, replies_to, text_of, wait_answer, wait_response
from tests.e2e.test_people import forget_prompt, press, stored_long_ago

pytestmark = pytest.mark.asyncio(loop_scope="session")

RATE = "3/10m"


class Running:
    def __init__(self, bot: BotProcess, emulator: DiscordEmulator, database: Path) -> None:
        self.bot, self.emulator, self.database = bot, emulator, database

    def rows(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.database) as connection:
            return connection.execute(sql, params).fetchall()

    def texts_of(self, user: EmulatedUser) -> list[str]:
        return [str(r[0]) for r in self.rows("SELECT text FROM turns WHERE author_id = ? ORDER BY id", user.id)]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    """One bot that may read others' messages, limits questions and keeps 30 days, with a database that
    already holds a conversation from 45 days ago and one from 2 days ago."""
    data = tmp_path_factory.mktemp("run-people")
    database = data / "bot.sqlite3"
    url = f"sqlite+aiosqlite:///{database}"
    async with DiscordEmulator() as emulator:
        await upgrade(url)
        old = StoredImage(data=png(seed=40) + b"old", mime="image/png", width=120, height=90)
        await stored_long_ago(url, emulator.channel_id, "asked long ago", old, days=45)
        await stored_long_ago(url, emulator.second_channel_id, "asked lately", None, days=2)
        config: dict[str, dict[str, object]] = {
            "discord": {"message_content_intent": True},
            "chat": {"rate_limit": RATE, "retention_days": 30},
            "model": {"engine": "scripted"},
        }
        async with BotProcess(emulator, data / "no-model", data, config) as bot:
            yield Running(bot, emulator, database)
        assert "Traceback" not in bot.log(), bot.log()


async def test_retention_runs_at_start(running: Running) -> None:
    def swept() -> bool | None:
        return running.rows("SELECT count(*) FROM turns")[0][0] == 2 or None

    await running.emulator.wait_for(swept, 60)
    assert [r[0] for r in running.rows("SELECT text FROM turns ORDER BY id")] == [
        "asked lately",
        "answer to asked lately",
    ]
    assert running.rows("SELECT count(*) FROM images")[0][0] == 0, "the old picture went with its turn"


async def test_several_attachments_use_the_first_image_and_name_the_rest(running: Running) -> None:
    emulator = running.emulator
    photo = png(seed=41)
    asked = await emulator.user_message(
        emulator.channel_id,
        emulator.user,
        "What is in the picture?",
        attachments=[("notes.txt", b"just words", "text/plain"), ("photo.png", photo, "image/png"),
                     ("other.jpg", jpeg(seed=42), "image/jpeg")],
    )  # fmt: skip
    answer = text_of(await wait_answer(emulator, asked, within=120))
    assert answer.rstrip().endswith("-# I looked only at photo.png; not used: notes.txt, other.jpg.")
    assert answer.startswith("You asked 'What is in the picture?'; I see 1 picture(s)"), (
        "an answer came before the note"
    )
    stored = running.rows("SELECT data FROM images WHERE sha256 = ?", hashlib.sha256(photo).hexdigest())
    assert stored == [(photo,)], "the upload itself is what the bot keeps"


async def test_a_reply_to_someone_elses_picture_is_about_it(running: Running) -> None:
    emulator = running.emulator
    photo = jpeg(seed=43)
    shared = await emulator.user_message(
        emulator.second_channel_id,
        emulator.other_user,
        "look at this",
        mention_bot=False,
        attachments=[("found.jpg", photo, "image/jpeg")],
    )
    asked = await emulator.user_message(emulator.second_channel_id, emulator.admin, "what is it?", reply_to=shared)
    answer = text_of(await wait_answer(emulator, asked, within=120))
    assert answer.startswith("You asked 'what is it?'; I see 1 picture(s)"), answer
    assert replies_to(emulator, int(shared["id"])) == []
    question = running.rows("SELECT image_sha256 FROM turns WHERE text = 'what is it?'")
    assert question == [(hashlib.sha256(photo).hexdigest(),)]


async def test_a_spoiler_is_answered_inside_spoiler_tags(running: Running) -> None:
    emulator = running.emulator
    asked = await emulator.user_message(
        emulator.thread_id, emulator.owner, "What is this?", attachments=[("SPOILER_x.png", png(seed=44), "image/png")]
    )
    parts = await wait_answer(emulator, asked, within=120)
    shown = [content for part in parts for content in part.history if not content.startswith("⏳")]
    assert shown and all(content.startswith("||") for content in shown), shown


async def test_the_rate_limit_answers_before_downloading(running: Running) -> None:
    emulator = running.emulator
    person = emulator.add_user("eager")
    count = int(RATE.split("/", maxsplit=1)[0])
    for seed in range(count):
        asked = await emulator.user_message(
            emulator.channel_id, person, "And this?", attachments=[("p.png", png(seed=50 + seed), "image/png")]
        )
        await wait_answer(emulator, asked, within=120)
    over = await emulator.user_message(
        emulator.channel_id, person, "One more?", attachments=[("q.png", png(seed=60), "image/png")]
    )
    [reply] = await emulator.wait_for(lambda: replies_to(emulator, int(over["id"])) or None, 60)
    assert re.fullmatch(r"You've reached the limit of 3 questions per 10 minutes\. You can ask again <t:\d+:R>\.",
                        reply.content), reply.content  # fmt: skip
    assert int(over["attachments"][0]["id"]) not in emulator.downloads


async def test_forget_deletes_what_a_person_stored(running: Running) -> None:
    emulator = running.emulator
    person = emulator.add_user("private")
    dm = emulator.dm_channel(person)
    for channel, seed in ((emulator.channel_id, 70), (dm, 71)):
        asked = await emulator.user_message(
            channel, person, "Describe it.", attachments=[("p.png", png(seed=seed), "image/png")]
        )
        await wait_answer(emulator, asked, within=120)
    assert running.texts_of(person) == ["Describe it.", "Describe it."]
    prompt = await forget_prompt(emulator, person, dm)
    await press(emulator, prompt, "forget:confirm", person)
    assert prompt.content == "Done: I deleted 2 questions, 2 answers and 2 images."
    assert running.texts_of(person) == []
    # Nothing of anyone else's went with it.
    assert "asked lately" in [r[0] for r in running.rows("SELECT text FROM turns")]


async def test_ask_is_answered_by_the_running_process(running: Running) -> None:
    emulator = running.emulator
    interaction = await emulator.slash_command(
        "ask", {"question": "What is it?", "image": ("a.png", png(seed=80), "image/png")}, user=emulator.admin
    )
    messages = await wait_response(emulator, interaction, within=120)
    assert text_of(messages).startswith("You asked 'What is it?'; I see 1 picture(s)")
