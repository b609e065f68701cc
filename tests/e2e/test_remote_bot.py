"""The bot with ``model.engine = "openai"`` against the real ``llava-bot serve`` process on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.chat.stopping import QUESTION_DELETED_NOTE, STOPPED_NOTE
from bot.cogs.stopping import STOP_ID
from bot.config import Config
from bot.engine import remote
from bot.engine.base import Turn
from tests.e2e.conftest import llava_bot
from tests.e2e.discord_emulator import JSON, DiscordEmulator, MessageRecord
from tests.e2e.helpers import (
    MARKER,
    ReferenceEngines,
    answer_messages,
    png,
    reply_content,
    seen_by_model,
    text_of,
    wait_answer,
    wait_response,
)
from tests.e2e.serve_process import ServeProcess

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Answers that last seconds, while the test strikes within milliseconds of seeing text.
LONG = 400


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
    remote_config.model.max_new_tokens = LONG
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


def writing(emulator: DiscordEmulator, asked: JSON) -> MessageRecord | None:
    """The message of the answer to ``asked`` that is being written: text still growing, under a Stop button."""
    growing = [
        m
        for m in answer_messages(emulator, asked)
        if m.content.endswith(MARKER) and any(b.get("custom_id") == STOP_ID for b in m.buttons)
    ]
    return growing[-1] if growing else None


async def stopped_on_the_server(server: ServeProcess, before: dict[str, int], max_new_tokens: int) -> None:
    """The server's generation ended (none running), as cancelled, short of the answer's full length."""
    after = await server.wait_health(lambda h: h["active"] == 0 and h.get("cancelled", 0) > before.get("cancelled", 0))
    assert after["cancelled"] == before.get("cancelled", 0) + 1
    assert after.get("completed", 0) == before.get("completed", 0), "the answer did not run to its end"
    assert 0 < after["tokens"] - before.get("tokens", 0) < max_new_tokens


async def test_stop_and_deleting_the_question_stop_the_generation_on_the_server(
    remote_config: Config, emulator: DiscordEmulator, reference: ReferenceEngines, server: ServeProcess
) -> None:
    remote_config.model.max_new_tokens = LONG
    channel, image = emulator.channel_id, png(seed=6)
    async with llava_bot(remote_config, emulator) as bot:
        # Stop, pressed by the asker while the server streams a long answer.
        before = server.health()
        asked = await emulator.user_message(
            channel, emulator.user, "Tell me everything.", attachments=[("a.png", image, "image/png")]
        )
        live = await emulator.wait_for(lambda: writing(emulator, asked), 120)
        assert server.health()["active"] == 1, "the server is generating the answer"
        await emulator.component_interaction(live, STOP_ID, user=emulator.user)
        await stopped_on_the_server(server, before, remote_config.model.max_new_tokens)
        stopped = text_of(await wait_answer(emulator, asked))

        # The question deleted by its author while the server streams its answer.
        before = server.health()
        deleted = await emulator.user_message(
            emulator.second_channel_id, emulator.user, "Tell me more.", attachments=[("b.png", image, "image/png")]
        )
        await emulator.wait_for(lambda: writing(emulator, deleted), 120)
        assert server.health()["active"] == 1
        await emulator.delete_message(deleted, by=emulator.user)
        await stopped_on_the_server(server, before, remote_config.model.max_new_tokens)
        gone = await emulator.wait_for(
            lambda: (parts := answer_messages(emulator, deleted)) and QUESTION_DELETED_NOTE in parts[-1].content, 30
        )

        # The next question runs to its end on the same server; the deleted exchange left no history behind.
        before = server.health()
        again = await emulator.user_message(
            emulator.second_channel_id, emulator.user, "What is this?", attachments=[("c.png", image, "image/png")]
        )
        answer = text_of(await wait_answer(emulator, again))
        assert bot.chat.scheduler.running == 0
    assert stopped.endswith(STOPPED_NOTE) and gone
    assert server.log().count("the client went away; its generation was stopped") >= 2
    after = server.health()
    assert after.get("completed", 0) == before.get("completed", 0) + 1 and after["active"] == 0
    expected = await reference.answer(
        local_twin(remote_config), [Turn("user", "What is this?", (seen_by_model(image),))]
    )
    assert answer == expected
