"""A person's two quick messages are taken in the order they were sent, however long each takes to prepare."""

from __future__ import annotations

import pytest

from bot.chat.scheduler import ALREADY_ASKING
from bot.chat.service import THINKING
from bot.config import Config
from tests.e2e.conftest import llava_bot
from tests.e2e.discord_emulator import DiscordEmulator
from tests.e2e.helpers import png, reply_content, text_of, wait_answer

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_the_first_message_wins_even_when_its_picture_downloads_slowly(
    bot_config: Config, emulator: DiscordEmulator
) -> None:
    alice = emulator.user
    download = emulator.hold_downloads("large.png")
    async with llava_bot(bot_config, emulator):
        first = await emulator.user_message(
            emulator.channel_id,
            alice,
            "What is in this picture?",
            attachments=[("large.png", png(seed=7), "image/png")],
        )
        # Sent right after, with nothing to download: ready long before the first.
        second = await emulator.user_message(emulator.channel_id, alice, "And what colour is it?")
        await emulator.wait_for(lambda: reply_content(emulator, second) == THINKING or None, 60)
        assert reply_content(emulator, first) == ""

        download.set()
        answer = text_of(await wait_answer(emulator, first, within=120))
        refusal = text_of(await wait_answer(emulator, second, within=60))

    assert answer.strip() and answer != ALREADY_ASKING
    assert refusal == ALREADY_ASKING
