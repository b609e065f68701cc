"""The Discord emulator drives a real discord.py ``commands.Bot`` end to end over loopback."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Literal

import aiohttp
import discord
import pytest
import pytest_asyncio
from discord import app_commands
from discord.ext import commands

from tests.e2e.discord_emulator import DiscordEmulator, point_discord_at, running_bot

pytestmark = pytest.mark.asyncio(loop_scope="session")

SILENT = discord.AllowedMentions.none()
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


class EchoBot(commands.Bot):
    """A small bot: answers mentions and DMs with a reply edited word by word, plus three slash commands."""

    def __init__(self) -> None:
        intents = discord.Intents.default()
        intents.message_content = False
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, guild_ready_timeout=0.05)
        self.seen: list[discord.Message] = []
        self.deleted: list[tuple[int, int, int | None]] = []
        self.bulk_deleted: list[tuple[set[int], int]] = []
        self.resumed = 0
        self.command_errors: list[app_commands.AppCommandError] = []
        self._add_commands()

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        """Record deletions (message id, channel id, guild id)."""
        self.deleted.append((payload.message_id, payload.channel_id, payload.guild_id))

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        """Record bulk deletions."""
        self.bulk_deleted.append((payload.message_ids, payload.channel_id))

    async def on_resumed(self) -> None:
        """Count gateway resumes."""
        self.resumed += 1

    async def on_message(self, message: discord.Message) -> None:
        """Reply to mentions and DMs, streaming the answer through edits."""
        if message.author == self.user:
            return
        self.seen.append(message)
        if not (isinstance(message.channel, discord.DMChannel) or self.user in message.mentions):
            return
        sizes = [len(await a.read()) for a in message.attachments]
        text = message.content.replace(f"<@{self.user.id}>", "").strip() if self.user else message.content
        reply = await message.reply("…", allowed_mentions=SILENT)
        words = f"echo: {text} {sizes}".split()
        for count in range(1, len(words) + 1):
            await reply.edit(content=" ".join(words[:count]), allowed_mentions=SILENT)

    def _add_commands(self) -> None:
        @self.tree.error
        async def record_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
            self.command_errors.append(error)

        @self.tree.command(description="Ask about an image")
        async def ask(interaction: discord.Interaction, question: str, image: discord.Attachment | None = None) -> None:
            await interaction.response.defer(thinking=True)
            size = len(await image.read()) if image else 0
            await interaction.followup.send(f"Q: {question} [{size} bytes]", allowed_mentions=SILENT)

        @self.tree.command(description="Show the status")
        async def status(interaction: discord.Interaction) -> None:
            await interaction.response.send_message("all good", ephemeral=True, allowed_mentions=SILENT)

        @self.tree.command(description="Answer too late")
        async def slow(interaction: discord.Interaction) -> None:
            await asyncio.sleep(0.3)
            await interaction.response.send_message("too late", allowed_mentions=SILENT)

        @self.tree.command(description="Choose the precision")
        async def precision(interaction: discord.Interaction, level: Literal["int4", "int8", "fp16"]) -> None:
            await interaction.response.defer()
            await interaction.edit_original_response(content=f"switching to {level}…", allowed_mentions=SILENT)
            await interaction.edit_original_response(content=f"precision is {level}", allowed_mentions=SILENT)


@pytest_asyncio.fixture
async def bot(emulator: DiscordEmulator) -> AsyncIterator[EchoBot]:
    """An :class:`EchoBot` connected to the emulator and ready."""
    async with running_bot(EchoBot(), emulator) as running:
        yield running


async def test_bot_connects_and_sees_the_guild(emulator: DiscordEmulator, bot: EchoBot) -> None:
    assert bot.user is not None and bot.user.id == emulator.bot_user.id
    assert emulator.compression == "zlib-stream"
    assert emulator.intents is not None and not emulator.intents & discord.Intents(message_content=True).value
    guild = bot.get_guild(emulator.guild_id)
    assert guild is not None and guild.name == "Test Guild"
    assert isinstance(guild.get_channel(emulator.channel_id), discord.TextChannel)
    assert isinstance(guild.get_channel(emulator.second_channel_id), discord.TextChannel)
    assert isinstance(guild.get_thread(emulator.thread_id), discord.Thread)
    admin_role = guild.get_role(emulator.admin_role_id)
    assert admin_role is not None and admin_role.permissions.administrator
    assert guild.default_role.id == guild.id
    owner = await guild.fetch_member(emulator.owner.id)
    admin = await guild.fetch_member(emulator.admin.id)
    user = await guild.fetch_member(emulator.user.id)
    assert await bot.is_owner(owner)
    assert not await bot.is_owner(admin)
    assert admin.guild_permissions.administrator
    assert not user.guild_permissions.administrator


@pytest.mark.parametrize("where", ["channel_id", "thread_id"])
async def test_mention_with_image_gets_a_streamed_silent_reply(
    emulator: DiscordEmulator, bot: EchoBot, where: str
) -> None:
    channel_id: int = getattr(emulator, where)
    sent = await emulator.user_message(
        channel_id, emulator.user, "what is this?", attachments=[("cat.png", IMAGE, "image/png")]
    )
    expected = f"echo: what is this? [{len(IMAGE)}]"
    reply = await emulator.wait_for_message(lambda m: m.content == expected, channel_id=channel_id)
    assert reply.reference_id == int(sent["id"])
    assert reply.history[0] == "…"
    assert reply.edits == len(expected.split())
    assert reply.pinged_user_ids == set()
    assert emulator.writes_that_may_ping() == []
    writes = emulator.message_writes()
    assert [w.method for w in writes] == ["POST"] + ["PATCH"] * reply.edits
    assert all(w.json["allowed_mentions"] == {"parse": []} for w in writes)
    assert bot.seen[0].attachments[0].url.startswith(emulator.url)


async def test_message_content_needs_a_mention_or_a_dm(emulator: DiscordEmulator, bot: EchoBot) -> None:
    await emulator.user_message(emulator.channel_id, emulator.user, "not for you", mention_bot=False)
    dm = emulator.dm_channel(emulator.other_user)
    await emulator.user_message(dm, emulator.other_user, "hello in private", mention_bot=False)
    reply = await emulator.wait_for_message(channel_id=dm)
    await emulator.wait_for(lambda: reply.content == "echo: hello in private []")
    assert [m.content for m in bot.seen] == ["", "hello in private"]
    assert bot.seen[1].guild is None
    assert emulator.bot_messages(emulator.channel_id) == []


async def test_other_peoples_messages_stay_hidden_in_replies_and_fetches(
    emulator: DiscordEmulator, bot: EchoBot
) -> None:
    shared = await emulator.user_message(
        emulator.channel_id,
        emulator.other_user,
        "my holiday",
        mention_bot=False,
        attachments=[("SPOILER_beach.png", IMAGE, "image/png")],
    )
    asked = await emulator.user_message(emulator.channel_id, emulator.user, "what is this?", reply_to=shared)
    await emulator.wait_for_message(lambda m: m.reference_id == int(asked["id"]) and m.content.startswith("echo"))
    question = next(m for m in bot.seen if m.id == int(asked["id"]))
    assert question.content.endswith("what is this?")
    replied = question.reference.resolved if question.reference else None
    assert isinstance(replied, discord.Message) and replied.id == int(shared["id"])
    assert (replied.content, replied.attachments) == ("", []), "Discord withholds a message not mentioning the bot"
    fetched = await bot.get_channel(emulator.channel_id).fetch_message(int(shared["id"]))  # type: ignore[union-attr]
    assert (fetched.content, fetched.attachments) == ("", [])
    # The question itself mentions the bot: fetched, it keeps its text. The spoiler mark is the file's.
    assert (await fetched.channel.fetch_message(question.id)).content == question.content
    assert shared["attachments"][0]["flags"] & 1 << 3


async def test_replying_to_the_bot_pings_it(emulator: DiscordEmulator, bot: EchoBot) -> None:
    await emulator.user_message(emulator.channel_id, emulator.user, "first")
    first = await emulator.wait_for_message(lambda m: m.content == "echo: first []")
    await emulator.user_message(emulator.channel_id, emulator.user, "again", mention_bot=False, reply_to=first)
    second = await emulator.wait_for_message(lambda m: m.content == "echo: again []")
    assert bot.seen[1].reference is not None and bot.seen[1].reference.message_id == first.id
    assert second.reference_id == bot.seen[1].id


async def test_content_over_2000_characters_is_rejected(emulator: DiscordEmulator, bot: EchoBot) -> None:
    channel = bot.get_channel(emulator.second_channel_id)
    assert isinstance(channel, discord.TextChannel)
    with pytest.raises(discord.HTTPException) as error:
        await channel.send("x" * 2001)
    assert error.value.status == 400 and error.value.code == 50035
    parts = ["a" * 2000, "b" * 10]
    for part in parts:
        await channel.send(part, allowed_mentions=SILENT)
    assert [m.content for m in emulator.bot_messages(emulator.second_channel_id)] == parts


async def test_file_uploads_are_stored_and_served(emulator: DiscordEmulator, bot: EchoBot) -> None:
    channel = bot.get_channel(emulator.channel_id)
    assert isinstance(channel, discord.TextChannel)
    message = await channel.send(
        "see attached", file=discord.File(io.BytesIO(b"long answer"), "answer.txt"), allowed_mentions=SILENT
    )
    assert [a.filename for a in message.attachments] == ["answer.txt"]
    assert await message.attachments[0].read() == b"long answer"
    edited = await message.edit(content="kept the file", allowed_mentions=SILENT)
    assert [a.id for a in edited.attachments] == [message.attachments[0].id]
    edited = await edited.edit(attachments=[], content="dropped it", allowed_mentions=SILENT)
    assert edited.attachments == []
    upload = emulator.requests_to("POST", "/messages$")[0]
    assert upload.json["allowed_mentions"] == {"parse": []} and upload.files[0][:2] == ("answer.txt", b"long answer")


async def test_slash_commands_sync_defer_and_follow_up(emulator: DiscordEmulator, bot: EchoBot) -> None:
    guild = discord.Object(emulator.guild_id)
    bot.tree.copy_global_to(guild=guild)
    synced = await bot.tree.sync(guild=guild)
    names = ["ask", "precision", "slow", "status"]
    assert sorted(c.name for c in synced) == names
    assert sorted(c["name"] for c in emulator.commands[emulator.guild_id]) == names
    assert [o["type"] for o in emulator.commands[emulator.guild_id][0]["options"]] == [3, 11]

    ask = await emulator.slash_command(
        "ask", {"question": "what?", "image": ("cat.png", IMAGE, "image/png")}, user=emulator.admin
    )
    await emulator.wait_for(lambda: emulator.interaction_responses(ask).contents == [f"Q: what? [{len(IMAGE)} bytes]"])
    answer = emulator.interaction_responses(ask)
    assert answer.callback_type == 5 and answer.deferred
    assert answer.original is not None and not answer.original.is_loading
    assert answer.original.history == ["", f"Q: what? [{len(IMAGE)} bytes]"]

    status = await emulator.slash_command("status", user=emulator.user)
    await emulator.wait_for(lambda: emulator.interaction_responses(status).contents == ["all good"])
    assert emulator.interaction_responses(status).ephemeral

    precision = await emulator.slash_command("precision", {"level": "int8"}, user=emulator.owner)
    await emulator.wait_for(lambda: emulator.interaction_responses(precision).contents == ["precision is int8"])
    assert emulator.interaction_responses(precision).original.edits == 2  # type: ignore[union-attr]
    assert emulator.writes_that_may_ping() == []


@pytest.mark.parametrize("announce", [False, True])
async def test_rate_limited_edits_are_retried(emulator: DiscordEmulator, bot: EchoBot, announce: bool) -> None:
    emulator.rate_limit_edits(limit=2, per_seconds=0.3, announce=announce)
    channel = bot.get_channel(emulator.channel_id)
    assert isinstance(channel, discord.TextChannel)
    message = await channel.send("0", allowed_mentions=SILENT)
    for step in range(1, 6):
        await message.edit(content=str(step), allowed_mentions=SILENT)
    record = emulator.messages[message.id]
    assert record.history == ["0", "1", "2", "3", "4", "5"]
    limited = [r for r in emulator.requests_to("PATCH") if r.status == 429]
    assert (len(limited) == 0) if announce else (len(limited) > 0)


async def test_gateway_reconnect_resumes_the_session(emulator: DiscordEmulator, bot: EchoBot) -> None:
    await emulator.request_reconnect()
    await emulator.wait_for(lambda: emulator.resume_count == 1 and emulator.connected)
    await emulator.wait_for(lambda: bot.resumed == 1)
    await emulator.user_message(emulator.channel_id, emulator.owner, "still there?")
    await emulator.wait_for_message(lambda m: m.content == "echo: still there? []")
    assert emulator.identify_count == 1


async def test_attachment_urls_expire_but_bytes_were_served(emulator: DiscordEmulator) -> None:
    attachment = emulator.add_attachment(emulator.channel_id, "cat.png", IMAGE, "image/png")
    async with aiohttp.ClientSession() as session:
        async with session.get(attachment["url"]) as response:
            assert response.status == 200 and await response.read() == IMAGE
            assert response.content_type == "image/png"
        emulator.expire_attachment_urls()
        async with session.get(attachment["proxy_url"]) as response:
            assert response.status == 404


async def test_late_interaction_callbacks_are_unknown(emulator: DiscordEmulator, bot: EchoBot) -> None:
    emulator.interaction_ack_timeout = 0.1
    slow = await emulator.slash_command("slow", user=emulator.user)
    await emulator.wait_for(lambda: emulator.requests_to("POST", "/callback$"))
    assert [r.status for r in emulator.requests_to("POST", "/callback$")] == [404]
    await emulator.wait_for(lambda: bot.command_errors)
    original = bot.command_errors[0].__cause__
    assert isinstance(original, discord.NotFound) and original.code == 10062
    assert emulator.interaction_responses(slow).callback_type is None


async def test_button_click_updates_the_message(emulator: DiscordEmulator, bot: EchoBot) -> None:
    class Clicker(discord.ui.View):
        @discord.ui.button(label="Stop", custom_id="stop")
        async def stop_button(self, interaction: discord.Interaction, button: discord.ui.Button[Clicker]) -> None:
            await interaction.response.edit_message(content="stopped", view=None, allowed_mentions=SILENT)

    channel = bot.get_channel(emulator.channel_id)
    assert isinstance(channel, discord.TextChannel)
    message = await channel.send("generating…", view=Clicker(), allowed_mentions=SILENT)
    assert emulator.messages[message.id].data["components"]
    click = await emulator.component_interaction(message.id, "stop", user=emulator.user)
    await emulator.wait_for(lambda: emulator.messages[message.id].content == "stopped")
    assert emulator.interaction_responses(click).callback_type == 7
    assert emulator.messages[message.id].data["components"] == []


async def test_components_are_shown_by_create_and_edit(emulator: DiscordEmulator, bot: EchoBot) -> None:
    view = discord.ui.View(timeout=None)
    view.add_item(discord.ui.Button(label="Stop", custom_id="stop"))
    channel = bot.get_channel(emulator.channel_id)
    assert isinstance(channel, discord.TextChannel)
    message = await channel.send("writing…", view=view, allowed_mentions=SILENT)
    await message.edit(content="still writing…", allowed_mentions=SILENT)
    await message.edit(content="done", view=None, allowed_mentions=SILENT)
    record = emulator.messages[message.id]
    # An edit without components keeps them, as on Discord; view=None removes them.
    assert [[b["label"] for b in _buttons(c)] for c in record.component_history] == [["Stop"], ["Stop"], []]
    assert record.buttons == []


def _buttons(components: list[dict[str, object]]) -> list[dict[str, object]]:
    return [b for row in components for b in row["components"]]  # type: ignore[attr-defined]


async def test_people_delete_messages_as_on_discord(emulator: DiscordEmulator, bot: EchoBot) -> None:
    asked = await emulator.user_message(emulator.channel_id, emulator.user, "hello")
    reply = await emulator.wait_for_message(lambda m: m.content == "echo: hello []")
    # A member can't delete the bot's reply; a moderator (here the admin) can.
    with pytest.raises(PermissionError):
        await emulator.delete_message(reply, by=emulator.user)
    await emulator.delete_message(reply, by=emulator.admin)
    await emulator.delete_message(asked, by=emulator.user)
    await emulator.wait_for(lambda: len(bot.deleted) == 2)
    assert bot.deleted == [
        (reply.id, emulator.channel_id, emulator.guild_id),
        (int(asked["id"]), emulator.channel_id, emulator.guild_id),
    ]
    assert emulator.messages[reply.id].deleted
    # Editing a deleted message is an "Unknown Message" 404.
    channel = bot.get_channel(emulator.channel_id)
    assert isinstance(channel, discord.TextChannel)
    with pytest.raises(discord.NotFound) as gone:
        await channel.get_partial_message(reply.id).edit(content="late", allowed_mentions=SILENT)
    assert gone.value.code == 10008


async def test_deletions_in_dms_and_in_bulk(emulator: DiscordEmulator, bot: EchoBot) -> None:
    dm = emulator.dm_channel(emulator.user)
    asked = await emulator.user_message(dm, emulator.user, "hi", mention_bot=False)
    reply = await emulator.wait_for_message(lambda m: m.content == "echo: hi []", channel_id=dm)
    with pytest.raises(PermissionError):
        await emulator.delete_message(reply, by=emulator.user)
    await emulator.delete_message(asked, by=emulator.user)
    await emulator.wait_for(lambda: bot.deleted)
    assert bot.deleted == [(int(asked["id"]), dm, None)]
    first = await emulator.user_message(emulator.channel_id, emulator.user, "one")
    second = await emulator.user_message(emulator.channel_id, emulator.other_user, "two")
    with pytest.raises(PermissionError):
        await emulator.bulk_delete(emulator.channel_id, [first, second], by=emulator.user)
    await emulator.bulk_delete(emulator.channel_id, [first, second], by=emulator.admin)
    await emulator.wait_for(lambda: bot.bulk_deleted)
    assert bot.bulk_deleted == [({int(first["id"]), int(second["id"])}, emulator.channel_id)]


async def test_point_discord_at_restores_the_defaults() -> None:
    emulator = DiscordEmulator()
    emulator.url = "http://127.0.0.1:9"
    before = (discord.http.Route.BASE, str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY))
    with point_discord_at(emulator):
        assert discord.http.Route("GET", "/users/@me").url == "http://127.0.0.1:9/api/v10/users/@me"
        assert str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == "ws://127.0.0.1:9/gateway"
    assert (discord.http.Route.BASE, str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)) == before
