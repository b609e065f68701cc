"""The bot's slash commands end to end: /ask, /reset, /precision and /status, answered by the scripted engine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.config import Config
from tests.e2e.conftest import llava_bot
from tests.e2e.discord_emulator import JSON, DiscordEmulator, EmulatedUser, InteractionResponses
from tests.e2e.helpers import (
    MARKER,
    png,
    reply_content,
    seen_by_model,
    text_of,
    wait_answer,
    wait_response,
)
from tests.support.scripted import Reply, default_answer, pixels, scripted

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def command(
    emulator: DiscordEmulator, name: str, options: JSON | None = None, *, user: EmulatedUser, channel_id: int = 0
) -> InteractionResponses:
    """Run a slash command that answers with one message; returns the bot's response once complete."""
    interaction = await emulator.slash_command(name, options, user=user, channel_id=channel_id or None)
    messages = await wait_response(emulator, interaction, quiet=0.3)
    assert len(messages) == 1, [m.content for m in messages]
    return emulator.interaction_responses(interaction)


def said(response: InteractionResponses) -> str:
    """The text of a one-message, ephemeral response."""
    assert response.ephemeral, "command answers meant for one person must be ephemeral"
    return response.contents[0]


# --- /ask ------------------------------------------------------------------------------------------
async def test_ask_with_an_image_is_deferred_then_streamed(scripted_config: Config, emulator: DiscordEmulator) -> None:
    scripted_config.model.max_new_tokens = 1500
    image = png(seed=7)
    pieces = [f"Detail {n}: a yellow square beside a red circle. " for n in range(120)]
    long = "".join(pieces)
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        engine.script(Reply(pieces, pace=0.01))
        interaction = await emulator.slash_command(
            "ask", {"question": "What is unusual here?", "image": ("p.png", image, "image/png")}, user=emulator.user
        )
        messages = await wait_response(emulator, interaction)
    [request] = engine.requests
    assert request.seen == [("user", "What is unusual here?", (pixels(seen_by_model(image)),))]
    responses = emulator.interaction_responses(interaction)
    callback = emulator.requests_to("POST", f"/interactions/{interaction.id}/")
    assert callback[0].at - interaction.created_at < 1.0, "the command must be acknowledged at once"
    original = responses.original
    assert original is not None and not responses.ephemeral
    assert original.history[0] == "", "the deferred response shows 'thinking' first"
    assert original.history[1].startswith("⏳")
    assert any(MARKER in content for content in original.history[2:-1]), "the answer did not stream"
    assert len(messages) >= 3 and responses.followups, "a long answer continues in follow-up messages"
    assert all(len(m.content) <= 2000 and MARKER not in m.content for m in messages)
    assert text_of(messages) == long
    assert emulator.writes_that_may_ping() == []


async def test_ask_without_image_is_text_chat(scripted_config: Config, emulator: DiscordEmulator) -> None:
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        interaction = await emulator.slash_command(
            "ask", {"question": "Tell me a story."}, user=emulator.user, channel_id=emulator.second_channel_id
        )
        messages = await wait_response(emulator, interaction)
        # It joins the channel's conversation like a mention would.
        follow_up = await emulator.user_message(emulator.second_channel_id, emulator.user, "Go on.")
        answer2 = await wait_answer(emulator, follow_up)
    assert emulator.interaction_responses(interaction).deferred
    first, second = engine.requests
    assert first.seen == [("user", "Tell me a story.", ())]
    assert text_of(messages) == first.answer
    assert second.seen == [("user", "Tell me a story.", ()), ("assistant", first.answer, ()), ("user", "Go on.", ())]
    assert text_of(answer2) == second.answer
    assert emulator.writes_that_may_ping() == []


# --- /reset ----------------------------------------------------------------------------------------
async def test_reset_forgets_the_channel(scripted_config: Config, emulator: DiscordEmulator) -> None:
    image = png(seed=8)
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        first = await emulator.user_message(
            emulator.channel_id, emulator.user, "What is this?", attachments=[("a.png", image, "image/png")]
        )
        await wait_answer(emulator, first)
        done = said(await command(emulator, "reset", user=emulator.other_user))
        fresh = await emulator.user_message(emulator.channel_id, emulator.user, "What is this?")
        answer = await wait_answer(emulator, fresh)
        nothing = said(await command(emulator, "reset", user=emulator.user, channel_id=emulator.second_channel_id))
    assert done == "Done: I forgot this channel's conversation (2 messages)."
    # Without the old history (and its image) the same words start a brand-new conversation.
    assert engine.requests[1].seen == [("user", "What is this?", ())]
    assert text_of(answer) == engine.requests[1].answer
    assert nothing == "There is nothing to reset: this channel has no conversation with me yet."
    assert emulator.writes_that_may_ping() == []


async def test_reset_while_answering_forgets_that_question_too(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    image = png(seed=12)
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        # A slow model: the question is taken, but the answer only comes once the reset is done.
        engine.script(Reply("A yellow square.", stall_after=0))
        first = await emulator.user_message(
            emulator.channel_id, emulator.user, "What is this?", attachments=[("a.png", image, "image/png")]
        )
        await emulator.wait_for(lambda: engine.stalled, 30)
        done = said(await command(emulator, "reset", user=emulator.user))
        engine.release()
        first_answer = await wait_answer(emulator, first)
        fresh = await emulator.user_message(emulator.channel_id, emulator.user, "And what colour is it?")
        answer = await wait_answer(emulator, fresh)
    assert done == "Done: I forgot this channel's conversation (1 message)."
    assert engine.requests[0].seen == [("user", "What is this?", (pixels(seen_by_model(image)),))]
    assert text_of(first_answer) == "A yellow square."
    # Neither the question nor its answer came back into the conversation.
    assert engine.requests[1].seen == [("user", "And what colour is it?", ())]
    assert text_of(answer) == engine.requests[1].answer


async def test_reset_can_be_reserved_for_admins(scripted_config: Config, emulator: DiscordEmulator) -> None:
    scripted_config.discord.reset_permission = "admins"
    async with llava_bot(scripted_config, emulator):
        asked = await emulator.user_message(emulator.channel_id, emulator.user, "Hello there")
        await wait_answer(emulator, asked)
        refused = said(await command(emulator, "reset", user=emulator.user))
        done = said(await command(emulator, "reset", user=emulator.owner))
    assert refused == "Only the bot's admins may reset this channel's conversation."
    assert done == "Done: I forgot this channel's conversation (2 messages)."


# --- /precision and /status ------------------------------------------------------------------------
def status_lines(text: str) -> dict[str, str]:
    lines = dict(line.split(":** ", 1) for line in text.splitlines())
    return {key.strip("*"): value for key, value in lines.items()}


async def test_status_shows_model_precision_engine_and_queue(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    async with llava_bot(scripted_config, emulator):
        status = said(await command(emulator, "status", user=emulator.user))
    lines = status_lines(status)
    # Discord shows <t:...:f> as a date and time in the reader's own time zone.
    assert re.fullmatch(r"up since <t:\d+:f>", lines.pop("Health")), status
    assert lines == {
        "Model": Path(scripted_config.model.dir).name,
        "Precision": "INT4 (available: INT4, INT8, FP16)",
        "Engine": "scripted on CPU",
        "Queue": "0 answering, 0 waiting",
        "Restarts": "0",
        "Last failure": "none",
    }


async def test_precision_is_switched_by_admins_and_kept(scripted_config: Config, emulator: DiscordEmulator) -> None:
    scripted_config.discord.admin_ids = [emulator.other_user.id]
    async with llava_bot(scripted_config, emulator) as bot:
        first_engine = scripted(bot)
        current = said(await command(emulator, "precision", user=emulator.user))
        refused = said(await command(emulator, "precision", {"precision": "INT8"}, user=emulator.user))
        # A server administrator is not one of the bot's admins.
        refused_admin = said(await command(emulator, "precision", {"precision": "INT8"}, user=emulator.admin))
        missing = said(await command(emulator, "precision", {"precision": "FP32"}, user=emulator.owner))
        by_listed_admin = said(await command(emulator, "precision", {"precision": "fp16"}, user=emulator.other_user))
        by_owner = said(await command(emulator, "precision", {"precision": "int8"}, user=emulator.owner))
        status = status_lines(said(await command(emulator, "status", user=emulator.user)))
        asked = await emulator.user_message(emulator.channel_id, emulator.user, "What is a cat?")
        answer = await wait_answer(emulator, asked)
        engine = scripted(bot)
    assert current == "The model runs at **INT4** (available: INT4, INT8, FP16)."
    assert refused == refused_admin == "Only the bot's owner and its admins may change the model's precision."
    assert missing == "FP32 is not available; choose one of INT4, INT8, FP16."
    assert by_listed_admin.startswith("Switched the model to **FP16**")
    assert by_owner.startswith("Switched the model to **INT8**")
    assert status["Precision"].startswith("INT8 ")
    # The question went to the INT8 model, which was loaded anew; the INT4 one was closed once unused.
    assert engine.precision == "INT8" and engine is not first_engine and first_engine.closed
    assert first_engine.requests == [] and [r.question for r in engine.requests] == ["What is a cat?"]
    assert text_of(answer) == engine.requests[0].answer

    # The choice is the bot's, not the process's: it survives a restart.
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        status = status_lines(said(await command(emulator, "status", user=emulator.user)))
        current = said(await command(emulator, "precision", user=emulator.other_user))
        asked = await emulator.user_message(emulator.second_channel_id, emulator.user, "What is a cat?")
        answer = await wait_answer(emulator, asked)
    assert status["Precision"].startswith("INT8 ")
    assert current.startswith("The model runs at **INT8**")
    assert engine.precision == "INT8" and text_of(answer) == engine.requests[0].answer
    assert emulator.writes_that_may_ping() == []


async def test_switching_precision_while_answering_finishes_the_answer(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    async with llava_bot(scripted_config, emulator) as bot:
        int4 = scripted(bot)
        # A slow model: the answer is half-written while the precision changes.
        int4.script(Reply("Everything I know, and then some more. " * 20, stall_after=50))
        asked = await emulator.user_message(emulator.channel_id, emulator.user, "Tell me everything.")
        await emulator.wait_for(lambda: int4.stalled and MARKER in reply_content(emulator, asked), 30)
        switch = await emulator.slash_command("precision", {"precision": "INT8"}, user=emulator.owner)
        await wait_response(emulator, switch, quiet=0.1)
        int4.release()
        switched = said(emulator.interaction_responses(switch))
        answer = await wait_answer(emulator, asked)
        after = await emulator.user_message(emulator.second_channel_id, emulator.user, "Tell me everything.")
        answer_after = await wait_answer(emulator, after)
        int8 = scripted(bot)
    assert switched.startswith("Switched the model to **INT8**")
    # The answer under way finishes, whole, on the precision it started with; the next uses the new one.
    assert (int4.precision, int8.precision) == ("INT4", "INT8")
    assert [r.outcome for r in int4.requests] == ["finished"] and len(int8.requests) == 1
    assert text_of(answer) == int4.requests[0].answer == "Everything I know, and then some more. " * 20
    assert text_of(answer_after) == int8.requests[0].answer == default_answer(int8.requests[0].conversation)
    assert int4.closed
