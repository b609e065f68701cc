"""The bot under pressure: a busy queue, bad uploads, a failing model, rate limits and an old database.

The scripted engine (tests/support/scripted.py) answers; the tests check what reached Discord and what the model
was asked.
"""

from __future__ import annotations

import io
import json
import random

import pytest
from PIL import Image
from sqlalchemy import text

from bot.chat.images import ImageLimits, load_image
from bot.config import Config
from bot.engine.base import EngineError
from bot.store.db import current_revision, head_revision, open_database, upgrade
from tests.e2e.conftest import llava_bot
from tests.e2e.discord_emulator import JSON, DiscordEmulator
from tests.e2e.helpers import (
    MARKER,
    WAITING,
    answer_messages,
    jpeg,
    png,
    png_header_only,
    replies_to,
    reply_content,
    seen_by_model,
    text_of,
    wait_answer,
    wait_response,
)
from tests.support.scripted import Reply, pixels, scripted

pytestmark = pytest.mark.asyncio(loop_scope="session")


# --- the queue -------------------------------------------------------------------------------------
async def test_a_busy_bot_queues_refuses_politely_and_answers_everyone(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    # Each asker uses their own channel.
    scripted_config.chat.max_queue = 2

    async def ask(channel_id: int, who: str, question: str) -> JSON:
        user = {"alice": emulator.user, "bob": emulator.other_user, "admin": emulator.admin, "owner": emulator.owner}
        asked = await emulator.user_message(channel_id, user[who], question)
        # Wait for the bot's reply before the next person asks, so the order of arrival is certain.
        await emulator.wait_for(lambda: replies_to(emulator, int(asked["id"])), 30)
        return asked

    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        # A slow model: the first answer stays half-written until everyone else has asked.
        engine.script(Reply("Cats purr and sleep a lot. " * 40, stall_after=50), "Dogs bark.", "Birds sing.")
        first = await ask(emulator.channel_id, "alice", "Tell me about cats.")
        await emulator.wait_for(lambda: engine.stalled and MARKER in reply_content(emulator, first), 30)
        second = await ask(emulator.second_channel_id, "bob", "Tell me about dogs.")
        await emulator.wait_for(lambda: "position 1" in reply_content(emulator, second), 30)
        third = await ask(emulator.thread_id, "admin", "Tell me about birds.")
        # The replies waiting in line show their places (and so are in line) before anyone else asks.
        await emulator.wait_for(lambda: "position 2" in reply_content(emulator, third), 30)
        too_many = await ask(emulator.dm_channel(emulator.owner), "owner", "Tell me about fish.")
        again = await ask(emulator.dm_channel(emulator.user), "alice", "And about lions?")
        status = await emulator.slash_command("status", user=emulator.owner)
        status_text = (await wait_response(emulator, status, quiet=0.1))[0].content
        engine.release()
        answers = [await wait_answer(emulator, asked) for asked in (first, second, third)]
        refusals = [await wait_answer(emulator, asked) for asked in (too_many, again)]

    assert "**Queue:** 1 answering, 2 waiting" in status_text.splitlines()
    assert [text_of(r) for r in refusals] == [
        "I'm busy: 2 questions are waiting already; please try again in a few minutes.",
        "I'm still working on your previous question; please wait for that answer first.",
    ]
    # While waiting, a reply shows its place in line, and moves up as the line moves.
    second_history = answers[1][0].history
    third_history = answers[2][0].history
    assert "⏳ Waiting in line: position 1." in second_history
    assert "⏳ Waiting in line: position 2." in third_history
    assert third_history.index("⏳ Waiting in line: position 2.") < third_history.index(
        "⏳ Waiting in line: position 1."
    )
    for history in (second_history, third_history):
        first_text = next(i for i, content in enumerate(history) if not content.startswith(WAITING))
        assert all(content.startswith(WAITING) for content in history[:first_text])
        assert all(not content.startswith(WAITING) for content in history[first_text:])
    assert not any(content.startswith("⏳ Waiting") for content in answers[0][0].history), "the first one never waited"
    # Everyone who got in line gets their own, complete answer; the refused questions never reached the model.
    assert [r.question for r in engine.requests] == [
        "Tell me about cats.",
        "Tell me about dogs.",
        "Tell me about birds.",
    ]
    assert [text_of(answer) for answer in answers] == [r.answer for r in engine.requests]
    assert [r.outcome for r in engine.requests] == ["finished"] * 3
    assert emulator.writes_that_may_ping() == []


# --- uploads ---------------------------------------------------------------------------------------
def noise_png(size: tuple[int, int]) -> bytes:
    """A PNG of random pixels: it can't be compressed, so its size is about 3 bytes a pixel."""
    pixels = random.Random(0).randbytes(size[0] * size[1] * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, pixels).save(buffer, "PNG")
    return buffer.getvalue()


async def test_bad_uploads_get_one_clear_sentence(scripted_config: Config, emulator: DiscordEmulator) -> None:
    scripted_config.chat.max_image_bytes = 1024 * 1024
    photo = jpeg(seed=3)
    oversized = noise_png((700, 700))
    assert 1024 * 1024 < len(oversized) < 1.5 * 1024 * 1024
    uploads = {
        "notes.png": (b"These are my shopping notes, not a picture.\n" * 20, "That file isn't an image I can read"),
        "huge.png": (oversized, "That image is too large (1.4 MB; the limit is 1 MB)."),
        "cut.jpg": (photo[: len(photo) // 2], "That image is damaged and can't be opened."),
        "bomb.png": (png_header_only(20_000, 20_000), "That image has too many pixels (the limit is 40 megapixels)."),
    }
    sentences: dict[str, str] = {}
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        for name, (data, _) in uploads.items():
            asked = await emulator.user_message(
                emulator.channel_id, emulator.user, "What is this?", attachments=[(name, data, "image/png")]
            )
            reply = await wait_answer(emulator, asked)
            assert len(reply) == 1
            sentences[name] = reply[0].content
        interaction = await emulator.slash_command(
            "ask",
            {"question": "What is this?", "image": ("notes.png", uploads["notes.png"][0], "image/png")},
            user=emulator.user,
        )
        ask_sentence = text_of(await wait_response(emulator, interaction))
        # And then the bot answers as usual.
        asked = await emulator.user_message(
            emulator.channel_id, emulator.user, "What is this?", attachments=[("photo.jpg", photo, "image/jpeg")]
        )
        answer = await wait_answer(emulator, asked)
    for name, (_, sentence) in uploads.items():
        assert sentences[name].startswith(sentence), (name, sentences[name])
        assert len(sentences[name]) < 100 and "\n" not in sentences[name], "one short sentence"
    assert ask_sentence == sentences["notes.png"]
    # None of the refused uploads became part of the conversation.
    [request] = engine.requests
    assert request.seen == [("user", "What is this?", (pixels(seen_by_model(photo)),))]
    assert text_of(answer) == request.answer
    assert emulator.writes_that_may_ping() == []


# --- a failing model -------------------------------------------------------------------------------
async def test_a_model_failure_mid_answer_is_explained_and_the_bot_carries_on(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    image = png(seed=9)
    sentence = "The model failed while answering (RuntimeError)."  # as the engines word a failure
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        engine.script(
            Reply(["It is ", "a picture of "], error=EngineError(sentence)),
            Reply(["Half an ", "answer"], error=ValueError("unexpected")),
        )
        asked = await emulator.user_message(
            emulator.channel_id, emulator.user, "What is this?", attachments=[("a.png", image, "image/png")]
        )
        failed = await wait_answer(emulator, asked)
        asked = await emulator.user_message(emulator.thread_id, emulator.user, "Still there?")
        broken = await wait_answer(emulator, asked)
        asked = await emulator.user_message(
            emulator.second_channel_id, emulator.user, "What is this?", attachments=[("a.png", image, "image/png")]
        )
        answer = await wait_answer(emulator, asked)
    assert text_of(failed) == f"It is a picture of \n\n⚠️ {sentence}"
    unexpected = "Something went wrong on my side while answering; the details were logged."
    assert text_of(broken) == f"Half an answer\n\n⚠️ {unexpected}"
    assert engine.requests[2].seen == [("user", "What is this?", (pixels(seen_by_model(image)),))]
    assert text_of(answer) == engine.requests[2].answer


# --- rate limits -----------------------------------------------------------------------------------
async def test_rate_limited_edits_still_end_with_the_complete_answer(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    scripted_config.model.max_new_tokens = 1500
    image = png(seed=10)
    emulator.rate_limit_edits(limit=2, per_seconds=1.0)
    # Long enough for several messages, streamed over a few seconds so that edits pile up.
    pieces = [f"Part {n} of a long description of the picture. " for n in range(160)]
    expected = "".join(pieces)
    async with llava_bot(scripted_config, emulator) as bot:
        scripted(bot).script(Reply(pieces, pace=0.01))
        asked = await emulator.user_message(
            emulator.channel_id, emulator.user, "Describe it.", attachments=[("a.png", image, "image/png")]
        )
        parts = await wait_answer(emulator, asked, quiet=1.5)
    assert [r for r in emulator.requests_to("PATCH") if r.status == 429], "the edits were never rate limited"
    assert len(parts) >= 3 and text_of(parts) == expected
    for part in parts:
        edits = [r for r in emulator.requests_to("PATCH", f"/messages/{part.id}$") if r.status == 200]
        if edits:
            assert edits[-1].json["content"] == part.content
        assert MARKER not in part.content
    assert emulator.writes_that_may_ping() == []


# --- an older database -----------------------------------------------------------------------------
async def test_a_database_at_the_previous_revision_is_upgraded_and_its_history_used(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    url = scripted_config.database.url
    await upgrade(url, "0001")
    picture = load_image(png(seed=11), ImageLimits())
    # The answer the previous version of the bot gave, still in the channel.
    old_answer = await emulator._create_bot_message(
        emulator.channel_id, {"content": "A yellow square and a red circle."}, {}, source="channel"
    )
    database = open_database(url)
    try:
        async with database.begin() as connection:
            await connection.execute(
                text("INSERT INTO images (sha256, data, mime, width, height) VALUES (:sha, :data, :mime, :w, :h)"),
                {
                    "sha": picture.sha256,
                    "data": picture.data,
                    "mime": picture.mime,
                    "w": picture.width,
                    "h": picture.height,
                },
            )
            insert = text(
                "INSERT INTO turns (channel_id, role, author_id, author_name, text, image_sha256, message_ids)"
                " VALUES (:channel, :role, :author, :name, :text, :image, :ids)"
            )
            await connection.execute(
                insert,
                [
                    {
                        "channel": emulator.channel_id,
                        "role": "user",
                        "author": emulator.user.id,
                        "name": "Alice",
                        "text": "What is in it?",
                        "image": picture.sha256,
                        "ids": json.dumps([emulator.snowflake()]),
                    },
                    {
                        "channel": emulator.channel_id,
                        "role": "assistant",
                        "author": None,
                        "name": None,
                        "text": old_answer.content,
                        "image": None,
                        "ids": json.dumps([old_answer.id]),
                    },
                ],
            )
    finally:
        await database.dispose()

    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        assert await current_revision(url) == head_revision()
        # The person replies to the old answer, which the bot still recognises as its own conversation.
        asked = await emulator.user_message(
            emulator.channel_id, emulator.user, "Which one is bigger?", mention_bot=False, reply_to=old_answer
        )
        answer = await wait_answer(emulator, asked)
        assert await bot.store.find_turn_by_message(old_answer.id) is not None
        reset = await emulator.slash_command("reset", user=emulator.user)
        reset_text = text_of(await wait_response(emulator, reset, quiet=0.3))
    [request] = engine.requests
    assert request.seen == [
        ("user", "What is in it?", (pixels(picture.image),)),
        ("assistant", old_answer.content, ()),
        ("user", "Which one is bigger?", ()),
    ]
    assert text_of(answer) == request.answer
    assert not any(MARKER in m.content for m in answer_messages(emulator, asked))
    assert reset_text == "Done: I forgot this channel's conversation (4 messages)."
