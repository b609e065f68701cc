"""Asking: a mention (or a reply to one of the bot's answers, or a DM) and the /ask command."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.chat.images import ImageLimits, ImageRejected, PreparedImage, check_size, download, load_image
from bot.chat.lifecycle import RESTARTING, TrackedSink
from bot.chat.service import DEFAULT_QUESTION, Question
from bot.chat.streaming import ReplyStreamer
from bot.cogs.replies import NO_PINGS, InteractionSink, MessageReplySink
from bot.store.replies import Interaction

if TYPE_CHECKING:
    from bot.client import LlavaBot

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
HOW_TO_ASK = "Send me a picture with a question (in a server, mention me), for example: what is unusual in this photo?"
REPLY_UNREADABLE = "I can't see the text of replies that don't mention me: keep the @ mention on when you reply."

_MENTION = re.compile(r"<@!?(\d+)>")


class ChatCog(commands.Cog):
    """Answers questions about images in channels, threads and DMs."""

    def __init__(self, bot: LlavaBot) -> None:
        self.bot = bot
        chat = bot.config.chat
        self.limits = ImageLimits(max_bytes=chat.max_image_bytes, max_pixels=chat.max_image_pixels)
        self._tasks: set[asyncio.Task[object]] = set()

    async def cog_unload(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- triggers ----------------------------------------------------------------------------------
    async def is_addressed(self, message: discord.Message) -> bool:
        """A mention of the bot itself, a reply to one of its answers, or a DM (when enabled)."""
        me = self.bot.user
        if me is None or message.author.bot or message.author.id == me.id:
            return False
        if message.guild is None:
            return self.bot.config.discord.answer_dms
        # @everyone, @here and role mentions are not addressed to the bot, only a mention of the bot is.
        if any(user.id == me.id for user in message.mentions):
            return True
        reference = message.reference
        if reference is None or reference.message_id is None:
            return False
        resolved = reference.resolved
        if isinstance(resolved, discord.Message):
            return resolved.author.id == me.id
        return await self.bot.store.find_turn_by_message(reference.message_id) is not None

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if not await self.is_addressed(message):
            return
        if not self.bot.answers.accepting:
            await self.say(message, RESTARTING)
            return
        # Each question runs as its own task so that a long answer never holds up the gateway.
        task = asyncio.create_task(self.handle_message(message), name=f"answer-{message.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.bot.answers.add(task)

    def question_text(self, content: str) -> str:
        """The question without the bot's mention."""
        me = self.bot.user
        text = _MENTION.sub(lambda m: "" if me is not None and int(m.group(1)) == me.id else m.group(0), content)
        return text.strip()

    async def handle_message(self, message: discord.Message) -> None:
        """Turn a Discord message into a question and stream the answer as a reply."""
        sink = TrackedSink(MessageReplySink(message), self.bot.replies, message.channel.id)
        try:
            image = await self.first_image(message.attachments)
        except ImageRejected as error:
            log.info("Rejected an attachment from %s in %s: %s", message.author.id, message.channel.id, error)
            await self.say(message, str(error))
            return
        text = self.question_text(message.content)
        if not text and image is None:
            await self.say(message, self.nothing_to_answer(message))
            return
        question = Question(
            channel_id=message.channel.id,
            author_id=message.author.id,
            author_name=message.author.display_name,
            text=text or DEFAULT_QUESTION,
            image=image,
            message_id=message.id,
        )
        try:
            await self.answer(question, sink)
        except discord.HTTPException:
            log.exception("Could not reply in channel %s", message.channel.id)

    async def answer(self, question: Question, sink: TrackedSink[discord.Message]) -> None:
        """Stream the answer into ``sink``; the reply's record is closed however the answer ends."""
        try:
            await self.bot.chat.answer(question, self.streamer(sink))
        finally:
            await asyncio.shield(sink.close())

    def nothing_to_answer(self, message: discord.Message) -> str:
        """Why there is no question: a bare mention, or a reply whose text Discord withheld from the bot."""
        me = self.bot.user
        mentioned = me is not None and any(user.id == me.id for user in message.mentions)
        # Without the Message Content intent, a server reply that doesn't ping the bot arrives without its text.
        return HOW_TO_ASK if message.guild is None or mentioned else REPLY_UNREADABLE

    async def say(self, message: discord.Message, sentence: str) -> None:
        """One short sentence as a reply, without pinging anyone."""
        try:
            await message.reply(sentence, mention_author=False, allowed_mentions=NO_PINGS)
        except discord.HTTPException:
            log.warning("Could not reply in channel %s", message.channel.id, exc_info=True)

    def streamer(
        self, sink: MessageReplySink | InteractionSink | TrackedSink[discord.Message]
    ) -> ReplyStreamer[discord.Message]:
        return ReplyStreamer(sink, edit_interval=self.bot.config.discord.edit_interval)

    async def first_image(self, attachments: list[discord.Attachment]) -> PreparedImage | None:
        """The first attachment, checked by its content; raises ImageRejected with the reason."""
        if not attachments:
            return None
        attachment = attachments[0]
        check_size(attachment.size, self.limits)
        data = await download(self.bot.http_session, attachment.url, self.limits)
        # Decoding a large image takes long enough to stall other channels; do it off the loop.
        return await asyncio.to_thread(load_image, data, self.limits)

    # --- /ask --------------------------------------------------------------------------------------
    @app_commands.command(name="ask", description="Ask a question, optionally about an image")
    @app_commands.describe(question="What you want to know", image="A picture to ask about")
    async def ask(
        self, interaction: discord.Interaction, question: str, image: discord.Attachment | None = None
    ) -> None:
        """Ask the model a question, optionally about an image; the answer streams into the response."""
        await interaction.response.defer(thinking=True)
        if not self.bot.answers.accepting:
            await interaction.edit_original_response(content=RESTARTING, allowed_mentions=NO_PINGS)
            return
        try:
            prepared = await self.first_image([image] if image else [])
        except ImageRejected as error:
            log.info("Rejected an /ask attachment from %s: %s", interaction.user.id, error)
            await interaction.edit_original_response(content=str(error), allowed_mentions=NO_PINGS)
            return
        channel_id = interaction.channel_id or interaction.user.id
        asked = Question(
            channel_id=channel_id,
            author_id=interaction.user.id,
            author_name=interaction.user.display_name,
            text=question.strip() or DEFAULT_QUESTION,
            image=prepared,
        )
        # Tracked like the answers to messages, so that shutting down ends this reply with a sentence too.
        webhook = Interaction(interaction.application_id, interaction.token)
        sink = TrackedSink(InteractionSink(interaction), self.bot.replies, channel_id, interaction=webhook)
        task = asyncio.create_task(self.answer(asked, sink), name=f"ask-{interaction.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.bot.answers.add(task)
        await task


async def setup(bot: LlavaBot) -> None:
    """Load the cog (discord.py extension entry point)."""
    await bot.add_cog(ChatCog(bot))
