"""The bot with ``model.engine = "openai"`` against the real ``llava-bot serve`` process on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.config import Config
from bot.engine import remote
from bot.engine.base import Turn
from tests.e2e.conftest import llava_bot
from tests.e2e.discord_emulator import DiscordEmulator
from tests.e2e.helpers import (
    MARKER,
    ReferenceEngines,
    png,
    reply_content,
    seen_by_model,
    text_of,
    wait_answer,
    wait_response,
)
from tests.e2e.serve_process import ServeProcess

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def server(tiny_llava: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """``llava-bot serve`` on the tiny INT4 folder with its default engine and settings."""
    with ServeProcess(tiny_llava[1] / "INT4", tmp_path_factory.mktemp("remote-bot-serve")) as process:
        yield process


@pytest.fixture
def remote_config(bot_config: Config, server: ServeProcess) -> Config:
    """The e2e bot, answering through the server; its model.dir only lends the tokenizer."""
    model = bot_config.model
    model.engine = "openai"
    model.base_url = server.base_url
    model.remote_model = server.name
    model.request_timeout = 30.0
    return bot_config


def local_twin(config: Config) -> Config:
    """The same settings with the server's engine in this process: what the server must answer."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, engine="genai-batching"))


async def test_questions_and_follow_ups_stream_from_the_server(
    remote_config: Config, emulator: DiscordEmulator, reference: ReferenceEngines, server: ServeProcess
) -> None:
    remote_config.model.max_new_tokens = 200
    image = png(seed=4)
    async with llava_bot(remote_config, emulator):
        first = await emulator.user_message(
            emulator.channel_id, emulator.user, "What is in this picture?", attachments=[("a.png", image, "image/png")]
        )
        parts = await wait_answer(emulator, first)
        second = await emulator.user_message(emulator.channel_id, emulator.user, "And what colour is it?")
        answer2 = text_of(await wait_answer(emulator, second))
        status = await emulator.slash_command("status", user=emulator.user)
        status_text = (await wait_response(emulator, status))[0].content
        precision = await emulator.slash_command("precision", user=emulator.owner)
        precision_text = (await wait_response(emulator, precision))[0].content
    answer1 = text_of(parts)
    assert len(parts[0].history) >= 3, "the reply was created first and then edited as text streamed in"
    assert any(MARKER in content for content in parts[0].history[1:-1])
    twin = local_twin(remote_config)
    conversation = [Turn("user", "What is in this picture?", (seen_by_model(image),))]
    assert answer1 == await reference.answer(twin, conversation)
    conversation += [Turn("assistant", answer1), Turn("user", "And what colour is it?")]
    assert answer2 == await reference.answer(twin, conversation)
    assert f"**Server:** {server.base_url}, model {server.name}: up" in status_text
    assert "server decides" in precision_text
    assert emulator.writes_that_may_ping() == []


async def test_a_server_killed_mid_answer_gives_a_sentence_and_a_restarted_one_answers(
    remote_config: Config, emulator: DiscordEmulator, reference: ReferenceEngines, server: ServeProcess
) -> None:
    remote_config.model.max_new_tokens = 1500
    image = png(seed=6)
    async with llava_bot(remote_config, emulator) as bot:
        asked = await emulator.user_message(
            emulator.channel_id, emulator.user, "Tell me everything.", attachments=[("a.png", image, "image/png")]
        )
        await emulator.wait_for(lambda: MARKER in reply_content(emulator, asked) or None, 120)
        server.kill()
        broken = text_of(await wait_answer(emulator, asked))
        assert bot.chat.scheduler.running == 0, "the slot was given back"

        await asyncio.to_thread(server.start)  # the bot keeps running meanwhile
        again = await emulator.user_message(
            emulator.second_channel_id, emulator.user, "What is this?", attachments=[("b.png", image, "image/png")]
        )
        answer = text_of(await wait_answer(emulator, again))
    assert broken.endswith(f"\n\n⚠️ {remote.BROKE_OFF}")
    assert len(broken) > len(remote.BROKE_OFF) + 4, "the text that had arrived stays"
    expected = await reference.answer(
        local_twin(remote_config), [Turn("user", "What is this?", (seen_by_model(image),))]
    )
    assert answer == expected
