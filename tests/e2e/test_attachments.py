"""What the bot looks at: several attachments, a reply to someone's picture, spoilers, the stored upload.

The scripted engine answers (tests/support/scripted.py); the tests check which pixels it was shown.
"""

from __future__ import annotations

import hashlib
import io
import re

import pytest
from PIL import Image

from bot.chat.images import NOT_AN_IMAGE
from bot.cogs.chat import REPLIED_HIDDEN
from bot.config import Config
from tests.e2e.conftest import llava_bot
from tests.e2e.discord_emulator import DiscordEmulator
from tests.e2e.helpers import jpeg, png, replies_to, text_of, unanswered, wait_answer
from tests.support.scripted import Reply, pixels, scripted

pytestmark = pytest.mark.asyncio(loop_scope="session")

NOTES = b"Shopping list: apples, bread, milk.\n"
SPOILER_TAGS = re.compile(r"\|\|([^|]*)\|\|")


def as_sent(upload: bytes) -> str:
    """The pixels of the picture in ``upload`` as any viewer decodes it (independent of the bot's own image code)."""
    with Image.open(io.BytesIO(upload)) as picture:
        return pixels(picture.convert("RGB"))


def note_of(answer: str) -> str:
    lines = answer.rstrip().splitlines()
    return lines[-1] if lines and lines[-1].startswith("-# ") else ""


async def test_a_text_file_beside_the_image_is_skipped(scripted_config: Config, emulator: DiscordEmulator) -> None:
    photo = png(seed=21)
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        asked = await emulator.user_message(
            emulator.channel_id,
            emulator.user,
            "What is in the picture?",
            attachments=[("notes.txt", NOTES, "text/plain"), ("photo.png", photo, "image/png")],
        )
        answer = text_of(await wait_answer(emulator, asked))
        stored = await bot.store.image_bytes(hashlib.sha256(photo).hexdigest())
        only_text = await emulator.user_message(
            emulator.channel_id, emulator.user, "And this?", attachments=[("notes.txt", NOTES, "text/plain")]
        )
        refusal = text_of(await wait_answer(emulator, only_text))
    [request] = engine.requests
    assert request.seen == [("user", "What is in the picture?", (as_sent(photo),))]
    assert answer == request.answer + "\n-# I looked only at photo.png; not used: notes.txt."
    assert stored == photo, "the upload itself is kept, byte for byte"
    text_ids = {int(a["id"]) for a in asked["attachments"] + only_text["attachments"] if a["filename"] == "notes.txt"}
    assert not text_ids & set(emulator.downloads), "a file Discord says is text was downloaded"
    # When nothing is an image, the person still learns why.
    assert refusal == NOT_AN_IMAGE


async def test_two_images_answer_about_the_first_and_name_the_second(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    first, second = png(seed=22), jpeg(seed=23)
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        asked = await emulator.user_message(
            emulator.channel_id,
            emulator.user,
            "Describe it.",
            attachments=[("broken.png", b"\x89PNG not really", "image/png"), ("first.png", first, "image/png"),
                         ("second.jpg", second, "image/jpeg")],
        )  # fmt: skip
        answer = text_of(await wait_answer(emulator, asked))
    assert as_sent(first) != as_sent(second), "the pictures must be told apart"
    [request] = engine.requests
    assert request.seen == [("user", "Describe it.", (as_sent(first),))]
    assert answer.startswith(request.answer)
    assert note_of(answer) == "-# I looked only at first.png; not used: broken.png, second.jpg."


async def test_a_mention_replying_to_someone_elses_picture_is_about_that_picture(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    scripted_config.discord.message_content_intent = True
    photo = jpeg(seed=24)
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        shared = await emulator.user_message(
            emulator.channel_id,
            emulator.other_user,
            "look what I found",
            mention_bot=False,
            attachments=[("found.jpg", photo, "image/jpeg")],
        )
        asked = await emulator.user_message(emulator.channel_id, emulator.user, "what is this?", reply_to=shared)
        answer = text_of(await wait_answer(emulator, asked))
        assert await unanswered(emulator, shared)
    assert emulator.intents is not None and emulator.intents & (1 << 15), "the bot asked for Message Content"
    [request] = engine.requests
    assert request.seen == [("user", "what is this?", (as_sent(photo),))]
    assert answer == request.answer


async def test_without_the_intent_a_reply_to_a_hidden_picture_says_so(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    async with llava_bot(scripted_config, emulator):
        shared = await emulator.user_message(
            emulator.channel_id,
            emulator.other_user,
            "look what I found",
            mention_bot=False,
            attachments=[("found.png", png(seed=25), "image/png")],
        )
        asked = await emulator.user_message(emulator.channel_id, emulator.user, "what is this?", reply_to=shared)
        answer = text_of(await wait_answer(emulator, asked))
    assert emulator.intents is not None and not emulator.intents & (1 << 15)
    assert answer == REPLIED_HIDDEN


async def test_a_spoilered_image_gets_its_answer_in_spoiler_tags(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    # Long enough to stream through several edits and to need several messages; with pipes, which would end
    # the spoiler early.
    scripted_config.model.max_new_tokens = 1500
    photo = png(seed=26)
    pieces = [f"Clue {n}: the butler || the gardener | the cook. " for n in range(90)]
    async with llava_bot(scripted_config, emulator) as bot:
        scripted(bot).script(Reply(pieces, pace=0.01))
        asked = await emulator.user_message(
            emulator.channel_id,
            emulator.user,
            "What is this?",
            attachments=[("SPOILER_ending.png", photo, "image/png")],
        )
        parts = await wait_answer(emulator, asked)
    expected = "".join(pieces)
    assert len(parts) >= 2, "a long answer continues in more messages"
    shown = [content for part in parts for content in part.history if not content.startswith("⏳")]
    assert len(shown) > len(parts), "the answer streamed by edits"
    for content in shown:
        assert len(content) <= 2000
        assert content.startswith("||") and SPOILER_TAGS.sub("", content).strip() in ("", "▌"), content
    hidden = "".join(SPOILER_TAGS.findall(text_of(parts)))
    assert hidden == expected.replace("|", "\u01c0")
    assert replies_to(emulator, int(asked["id"]))[0].history[0].startswith("⏳"), "the status line is not hidden"


async def test_a_follow_up_after_a_restart_sees_the_same_pixels(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    # A JPEG: storing a re-encoded copy would change its pixels.
    photo = jpeg(seed=27, size=(200, 150))
    async with llava_bot(scripted_config, emulator) as bot:
        before = scripted(bot)
        first = await emulator.user_message(
            emulator.channel_id, emulator.user, "What is this?", attachments=[("p.jpg", photo, "image/jpeg")]
        )
        answer1 = text_of(await wait_answer(emulator, first))
    # A new process has no decoded picture in memory: it reloads the stored bytes.
    async with llava_bot(scripted_config, emulator) as bot:
        after = scripted(bot)
        second = await emulator.user_message(emulator.channel_id, emulator.user, "What colour is it?")
        answer2 = text_of(await wait_answer(emulator, second))
    assert before.requests[0].seen == [("user", "What is this?", (as_sent(photo),))]
    assert answer1 == before.requests[0].answer
    assert after.requests[0].seen == [
        ("user", "What is this?", (as_sent(photo),)),
        ("assistant", answer1, ()),
        ("user", "What colour is it?", ()),
    ]
    assert answer2 == after.requests[0].answer
