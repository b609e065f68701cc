"""The whole bot against the loopback Discord emulator: asking and conversations.

The first test answers with the tiny model and compares with the engine alone; the others answer with the
scripted engine (tests/support/scripted.py) and check what reached Discord and what the model was asked.
"""

from __future__ import annotations

import pytest

from bot.cogs.chat import HOW_TO_ASK, REPLY_UNREADABLE
from bot.config import Config
from bot.engine.base import Turn
from tests.e2e.conftest import llava_bot
from tests.e2e.discord_emulator import JSON, DiscordEmulator, EmulatedUser, MessageRecord
from tests.e2e.helpers import (
    MARKER,
    ReferenceEngines,
    answer_messages,
    png,
    replies_to,
    reply_content,
    seen_by_model,
    text_of,
    unanswered,
    wait_answer,
)
from tests.support.scripted import Reply, default_answer, pixels, scripted

pytestmark = pytest.mark.asyncio(loop_scope="session")


def assert_silent(emulator: DiscordEmulator) -> None:
    """No write of the bot could have pinged anyone, and no message it made did."""
    assert emulator.writes_that_may_ping() == []
    for message in emulator.bot_messages():
        assert message.pinged_user_ids == set() and message.pinged_role_ids == set(), message.content
        assert not message.pinged_everyone, message.content


async def raw_message(
    emulator: DiscordEmulator, channel_id: int, author: EmulatedUser, content: str, **fields: object
) -> JSON:
    """A guild message dispatched with its content and the given mention fields, as the emulator's helper can't."""
    data = emulator._message_data(channel_id, author, content)
    data.update(fields)
    record = MessageRecord(int(data["id"]), channel_id, author.id, data, "user", history=[content])
    emulator.messages[record.id] = record
    await emulator.dispatch("MESSAGE_CREATE", emulator._gateway_message(data, emulator.channels[channel_id]))
    return data


async def test_mention_with_image_streams_the_engine_answer(
    bot_config: Config, emulator: DiscordEmulator, reference: ReferenceEngines
) -> None:
    # Long enough to take a few edit intervals, and to need several messages.
    bot_config.model.max_new_tokens = 1000
    image = png()
    async with llava_bot(bot_config, emulator):
        asked = await emulator.user_message(
            emulator.channel_id, emulator.user, "What is unusual here?", attachments=[("photo.png", image, "image/png")]
        )
        parts = await wait_answer(emulator, asked)
    expected = await reference.answer(bot_config, [Turn("user", "What is unusual here?", (seen_by_model(image),))])
    reply = parts[0]
    assert len(parts) >= 3, "a long answer should continue in follow-up messages"
    assert all(len(part.content) <= 2000 for part in parts)
    assert text_of(parts) == expected
    assert len(reply.history) >= 3, "the reply was not created first and then edited as tokens arrived"
    assert reply.history[0].startswith("⏳")
    assert any(MARKER in content for content in reply.history[1:-1])
    assert not any(MARKER in part.content for part in parts)
    assert_silent(emulator)


async def test_follow_up_without_image_uses_the_conversation(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    image = png(seed=1)
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        first = await emulator.user_message(
            emulator.channel_id, emulator.user, "What is in this picture?", attachments=[("a.png", image, "image/png")]
        )
        answer1 = text_of(await wait_answer(emulator, first))
        second = await emulator.user_message(emulator.channel_id, emulator.user, "And what colour is it?")
        answer2 = text_of(await wait_answer(emulator, second))
    asked = engine.requests
    picture = pixels(seen_by_model(image))
    assert asked[0].seen == [("user", "What is in this picture?", (picture,))]
    assert answer1 == asked[0].answer == default_answer(asked[0].conversation)
    assert asked[1].seen == [
        ("user", "What is in this picture?", (picture,)),
        ("assistant", answer1, ()),
        ("user", "And what colour is it?", ()),
    ]
    assert answer2 == asked[1].answer
    assert_silent(emulator)


async def test_a_reply_to_an_answer_is_a_follow_up(scripted_config: Config, emulator: DiscordEmulator) -> None:
    image = png(seed=2)
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        first = await emulator.user_message(
            emulator.channel_id, emulator.user, "Describe it.", attachments=[("a.png", image, "image/png")]
        )
        answer1 = await wait_answer(emulator, first)
        # A plain Discord reply: no mention typed, the reply itself notifies the bot (Discord's default).
        follow_up = await emulator.user_message(
            emulator.channel_id, emulator.other_user, "Is it outdoors?", mention_bot=False, reply_to=answer1[0]
        )
        answer2 = await wait_answer(emulator, follow_up)
    asked = engine.requests
    assert asked[1].seen == [
        ("user", "Describe it.", (pixels(seen_by_model(image)),)),
        ("assistant", text_of(answer1), ()),
        ("user", "Is it outdoors?", ()),
    ]
    assert text_of(answer2) == asked[1].answer
    assert answer2[0].reference_id == int(follow_up["id"])
    assert_silent(emulator)


async def test_only_messages_addressed_to_the_bot_are_answered(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    image = ("a.png", png(seed=3), "image/png")
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        plain = await emulator.user_message(
            emulator.channel_id, emulator.user, "what is this?", mention_bot=False, attachments=[image]
        )
        everyone = await raw_message(
            emulator, emulator.channel_id, emulator.user, "@everyone what is this?", mention_everyone=True
        )
        here = await raw_message(emulator, emulator.channel_id, emulator.user, "@here look", mention_everyone=True)
        roles = [emulator.bot_role_id, emulator.admin_role_id]
        role = await raw_message(
            emulator,
            emulator.channel_id,
            emulator.user,
            " ".join(f"<@&{r}>" for r in roles) + " what is this?",
            mention_roles=[str(r) for r in roles],
        )
        other = await raw_message(
            emulator,
            emulator.channel_id,
            emulator.user,
            f"{emulator.other_user.mention} what is this?",
            mentions=[emulator.other_user.payload()],
        )
        # A reply to someone else's message is not a question for the bot either.
        to_person = await emulator.user_message(
            emulator.channel_id, emulator.other_user, "no idea", mention_bot=False, reply_to=plain
        )
        # Asked after all of the above: once it is answered, any answer to them would have shown.
        control = await emulator.user_message(emulator.channel_id, emulator.user, "what is this?", attachments=[image])
        answered = await wait_answer(emulator, control)
        assert await unanswered(emulator, plain, everyone, here, role, other, to_person)
    [request] = engine.requests
    assert request.seen == [("user", "what is this?", (pixels(seen_by_model(image[1])),))]
    assert text_of(answered) == request.answer
    assert [m.id for m in emulator.bot_messages()] == [m.id for m in answered]


async def test_a_reply_the_bot_cannot_read_says_how_to_reply(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    async with llava_bot(scripted_config, emulator):
        first = await emulator.user_message(emulator.channel_id, emulator.user, "Hello!")
        answer = await wait_answer(emulator, first)
        bare = await emulator.user_message(emulator.channel_id, emulator.user)
        how_to_ask = await wait_answer(emulator, bare)
        # With the reply's ping switched off Discord withholds the text from the bot (no Message Content intent).
        silent = await emulator.user_message(
            emulator.channel_id, emulator.user, "And then?", mention_bot=False, reply_to=answer[0], reply_ping=False
        )
        unreadable = await wait_answer(emulator, silent)
    assert text_of(how_to_ask) == HOW_TO_ASK
    assert text_of(unreadable) == REPLY_UNREADABLE
    assert_silent(emulator)


async def test_direct_messages_are_answered(scripted_config: Config, emulator: DiscordEmulator) -> None:
    image = png(seed=4)
    dm = emulator.dm_channel(emulator.user)
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        first = await emulator.user_message(
            dm, emulator.user, "What do you see?", mention_bot=False, attachments=[("a.png", image, "image/png")]
        )
        answer1 = text_of(await wait_answer(emulator, first))
        second = await emulator.user_message(dm, emulator.user, "Anything else?", mention_bot=False)
        answer2 = await wait_answer(emulator, second)
    asked = engine.requests
    assert answer1 == asked[0].answer
    assert asked[1].seen == [
        ("user", "What do you see?", (pixels(seen_by_model(image)),)),
        ("assistant", answer1, ()),
        ("user", "Anything else?", ()),
    ]
    assert text_of(answer2) == asked[1].answer
    assert all(m.channel_id == dm for m in emulator.bot_messages())
    assert_silent(emulator)


async def test_direct_messages_are_ignored_when_disabled(scripted_config: Config, emulator: DiscordEmulator) -> None:
    scripted_config.discord.answer_dms = False
    dm = emulator.dm_channel(emulator.user)
    async with llava_bot(scripted_config, emulator):
        asked = await emulator.user_message(
            dm, emulator.user, "What do you see?", mention_bot=False, attachments=[("a.png", png(), "image/png")]
        )
        mentioned = await emulator.user_message(dm, emulator.user, "Hello?")
        # Mentions in servers are still answered.
        control = await emulator.user_message(emulator.channel_id, emulator.user, "Hello?")
        await wait_answer(emulator, control)
        assert await unanswered(emulator, asked, mentioned)
    assert emulator.bot_messages(dm) == []


async def test_nothing_the_model_writes_pings_anyone(scripted_config: Config, emulator: DiscordEmulator) -> None:
    pings = [
        "@everyone look: ",
        "@here too, ",
        f"{emulator.user.mention} and {emulator.owner.mention}, ",
        f"<@&{emulator.admin_role_id}> ",
        "the end.",
    ]
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        engine.script(Reply(pings))
        asked = await emulator.user_message(
            emulator.channel_id, emulator.user, "Say hi to everyone", attachments=[("a.png", png(), "image/png")]
        )
        parts = await wait_answer(emulator, asked)
    assert text_of(parts) == "".join(pings)
    reply = parts[0]
    # The asker isn't notified by the reply, and nobody by what the model wrote.
    assert reply.pinged_user_ids == set() and reply.pinged_role_ids == set() and not reply.pinged_everyone
    assert not reply.data["mention_everyone"] and reply.data["mentions"] == [] and reply.data["mention_roles"] == []
    writes = emulator.message_writes()
    assert len(writes) >= 2
    for write in writes:
        allowed = write.json["allowed_mentions"]
        assert allowed["parse"] == [] and not allowed.get("users") and not allowed.get("roles"), write
        assert not allowed.get("replied_user", False), write
    assert_silent(emulator)


async def test_history_survives_a_restart(scripted_config: Config, emulator: DiscordEmulator) -> None:
    image = png(seed=5)
    async with llava_bot(scripted_config, emulator):
        first = await emulator.user_message(
            emulator.channel_id, emulator.user, "What is this?", attachments=[("a.png", image, "image/png")]
        )
        answer1 = text_of(await wait_answer(emulator, first))
    # A new process: nothing is remembered but what the database holds.
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        second = await emulator.user_message(emulator.channel_id, emulator.user, "Where was it taken?")
        answer2 = await wait_answer(emulator, second)
    [request] = engine.requests
    assert request.seen == [
        ("user", "What is this?", (pixels(seen_by_model(image)),)),
        ("assistant", answer1, ()),
        ("user", "Where was it taken?", ()),
    ]
    assert text_of(answer2) == request.answer
    assert not any(MARKER in m.content for m in answer_messages(emulator, second))
    assert replies_to(emulator, int(first["id"]))[0].content == answer1


async def test_a_restart_while_answering_ends_every_reply_with_a_sentence(
    scripted_config: Config, emulator: DiscordEmulator
) -> None:
    stopped = "I was stopped before I could finish."
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        # A slow model: the first answer stays half-written until the others are in line, and the bot stops then.
        engine.script(Reply("Everything there is to know, " * 20, stall_after=50))
        streaming = await emulator.user_message(emulator.channel_id, emulator.user, "Tell me everything.")
        await emulator.wait_for(lambda: engine.stalled and MARKER in reply_content(emulator, streaming), 30)
        waiting = await emulator.user_message(emulator.second_channel_id, emulator.other_user, "Me too.")
        # In line first, so that the command's place is known (a busy machine may take the two in either order).
        await emulator.wait_for(lambda: "position 1" in reply_content(emulator, waiting), 30)
        asked = await emulator.slash_command(
            "ask", {"question": "And me?"}, user=emulator.admin, channel_id=emulator.thread_id
        )

        def queued() -> bool:
            original = emulator.interaction_responses(asked).original
            return bool(original and "position 2" in original.content)

        await emulator.wait_for(queued, 30)
    # Shut down mid-answer: no reply is left looking as if it were still being written.
    await emulator.wait_quiet(0.5, 30)
    cut = answer_messages(emulator, streaming)
    assert text_of(cut) == f"{engine.requests[0].answer}\n\n⚠️ {stopped}"
    assert replies_to(emulator, int(waiting["id"]))[0].content == stopped
    assert emulator.interaction_responses(asked).contents == [stopped]
    assert not any(MARKER in m.content or m.content.startswith("⏳") for m in emulator.bot_messages())

    # The next start answers as usual.
    async with llava_bot(scripted_config, emulator) as bot:
        engine = scripted(bot)
        again = await emulator.user_message(emulator.second_channel_id, emulator.other_user, "Hello?")
        answer = await wait_answer(emulator, again)
    assert text_of(answer) == engine.requests[0].answer == default_answer([Turn("user", "Hello?")])
