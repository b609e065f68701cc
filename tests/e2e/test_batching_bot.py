"""The default engine, continuous batching, through the whole bot: channels are answered together."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.config import Config
from bot.engine.base import GenerationSettings, Turn
from bot.engine.manager import load_engine
from tests.conftest import F32
from tests.e2e.conftest import llava_bot
from tests.e2e.discord_emulator import DiscordEmulator
from tests.e2e.helpers import png, seen_by_model, text_of, wait_answer


async def test_channels_are_answered_together_and_follow_ups_use_history(
    bot_config: Config, emulator: DiscordEmulator
) -> None:
    # Exact comparison needs f32 arithmetic: in bf16 or with INT4 kernels a batch of several sequences may
    # round differently from one sequence alone.
    bot_config.model.engine = "genai-batching"
    bot_config.model.precision = "FP16"
    bot_config.model.ov_config.update(F32)
    bot_config.model.max_new_tokens = 200
    channels = (emulator.channel_id, emulator.second_channel_id, emulator.thread_id)
    people = (emulator.user, emulator.other_user, emulator.admin)
    uploads = [png(seed=i) for i in range(3)]
    async with llava_bot(bot_config, emulator) as bot:
        assert bot.chat.scheduler.running == 0
        asked = await asyncio.gather(
            *(
                emulator.user_message(
                    channel, person, f"What is in picture {i}?", attachments=[("p.png", up, "image/png")]
                )
                for i, (channel, person, up) in enumerate(zip(channels, people, uploads, strict=True))
            )
        )
        # All three stream at once: each shows text before any of them has finished.
        await emulator.wait_for(lambda: bot.chat.scheduler.running == 3, 30)
        answers = [text_of(await wait_answer(emulator, a)) for a in asked]
        follow_up = await emulator.user_message(channels[0], people[0], "And the colours?")
        follow_up_answer = text_of(await wait_answer(emulator, follow_up))
    engine = await asyncio.to_thread(
        load_engine, "genai-batching", Path(bot_config.model.dir) / "FP16", "CPU", bot_config.model.ov_config
    )
    settings = GenerationSettings(max_new_tokens=bot_config.model.max_new_tokens)
    try:
        for i, answer in enumerate(answers):
            alone = [Turn("user", f"What is in picture {i}?", (seen_by_model(uploads[i]),))]
            assert answer == await engine.generate(alone, settings).text(), f"channel {i}"
        conversation = [
            Turn("user", "What is in picture 0?", (seen_by_model(uploads[0]),)),
            Turn("assistant", answers[0]),
            Turn("user", "And the colours?"),
        ]
        assert follow_up_answer == await engine.generate(conversation, settings).text()
    finally:
        engine.close()
    assert emulator.writes_that_may_ping() == []
