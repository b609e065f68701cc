"""The real `llava-bot run` answers a mention with the default engine and never imports PyTorch or transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.bot_process import BotProcess
from tests.e2e.discord_emulator import DiscordEmulator
from tests.e2e.helpers import png, text_of, wait_answer
from tests.engine.test_serving_imports import heavy_imports, imported

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_run_answers_without_importing_pytorch(
    tiny_llava: tuple[Path, Path], tmp_path: Path, emulator: DiscordEmulator
) -> None:
    env = {"PYTHONPROFILEIMPORTTIME": "1"}  # inherited by the batching engine's process as well
    async with BotProcess(emulator, tiny_llava[1], tmp_path, env=env) as bot:
        asked = await emulator.user_message(
            emulator.channel_id, emulator.user, "What is this?", attachments=[("a.png", png(), "image/png")]
        )
        answer = text_of(await wait_answer(emulator, asked, within=120))
        log = bot.log()
    assert answer.strip()
    names = imported(log)
    assert names.count("bot.engine.template") == 2, "the profile should cover the bot and its engine process"
    assert heavy_imports(log) == []
