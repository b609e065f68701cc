"""The whole bot against the loopback Discord emulator, answering with the tiny model."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from bot.chat.images import ImageLimits, load_image
from bot.config import Config
from bot.engine.base import GenerationSettings, Turn
from bot.engine.manager import load_engine
from tests.conftest import sample_image
from tests.e2e.conftest import llava_bot
from tests.e2e.discord_emulator import DiscordEmulator, MessageRecord


def png(seed: int = 0, size: tuple[int, int] = (120, 90)) -> bytes:
    buffer = io.BytesIO()
    sample_image(size, seed).save(buffer, "PNG")
    return buffer.getvalue()


async def engine_answer(config: Config, conversation: list[Turn]) -> str:
    """What the engine alone generates for ``conversation`` with the bot's settings."""
    engine = await asyncio.to_thread(load_engine, config.model.engine, Path(config.model.dir) / config.model.precision)
    try:
        settings = GenerationSettings(max_new_tokens=config.model.max_new_tokens)
        return await engine.generate(conversation, settings).text()
    finally:
        engine.close()


def reply_to(emulator: DiscordEmulator, message_id: int) -> list[MessageRecord]:
    return [m for m in emulator.bot_messages() if m.reference_id == message_id]


async def final_reply(emulator: DiscordEmulator, asked: dict, timeout: float = 60) -> MessageRecord:
    """The bot's reply to ``asked`` once it has stopped changing (no still-writing marker)."""

    def done() -> MessageRecord | None:
        replies = reply_to(emulator, int(asked["id"]))
        if replies and "▌" not in replies[0].content and not replies[0].content.startswith("⏳"):
            return replies[0]
        return None

    reply = await emulator.wait_for(done, timeout)
    await emulator.wait_quiet(0.5, timeout)
    return reply


async def test_mention_with_image_streams_the_engine_answer(bot_config: Config, emulator: DiscordEmulator) -> None:
    # Long enough to take a few edit intervals, and to need several messages.
    bot_config.model.max_new_tokens = 1500
    image = png()
    async with llava_bot(bot_config, emulator):
        asked = await emulator.user_message(
            emulator.channel_id, emulator.user, "What is unusual here?", attachments=[("photo.png", image, "image/png")]
        )
        reply = await final_reply(emulator, asked)
    prepared = load_image(image, ImageLimits())
    expected = await engine_answer(bot_config, [Turn("user", "What is unusual here?", (prepared.image,))])
    parts = [m for m in emulator.bot_messages(emulator.channel_id) if m.id >= reply.id]
    assert len(parts) >= 3, "a long answer should continue in follow-up messages"
    assert all(len(part.content) <= 2000 for part in parts)
    assert "".join(part.content for part in parts) == expected
    assert len(reply.history) >= 3, "the reply was not created first and then edited as tokens arrived"
    assert reply.history[0].startswith("⏳")
    assert any("▌" in content for content in reply.history[1:-1])
    assert not any("▌" in part.content for part in parts)
    assert emulator.writes_that_may_ping() == []
