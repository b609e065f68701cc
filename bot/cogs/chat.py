"""Asking: a mention (or a reply to one of the bot's answers, or a DM) and the /ask command."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.chat.arrivals import Arrival, ArrivalOrder
from bot.chat.images import (
    NOT_AN_IMAGE,
    ImageLimits,
    ImageRejected,
    check_size,
    download,
    load_image,
)
from bot.chat.lifecycle import RESTARTING, TrackedSink
from bot.chat.service import DEFAULT_QUESTION, Question
from bot.chat.spoilers import SpoilerStreamer
from bot.chat.streaming import ReplyStreamer
from bot.cogs.gate import QuestionGate
from bot.cogs.replies import NO_PINGS, InteractionSink, MessageReplySink
from bot.engine.base import ImageRef
from bot.store.replies import Interaction

if TYPE_CHECKING:
    from bot.client import LlavaBot

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
HOW_TO_ASK = "Send me a picture with a question (in a server, mention me), for example: what is unusual in this photo?"
REPLY_UNREADABLE = "I can't see the text of replies that don't mention me: keep the @ mention on when you reply."
REPLIED_HIDDEN = (
    "I can't see the message you replied to: Discord only shows me messages that mention me. "
    "Send the picture with your question instead."
)
NOT_USED_NOTE = "\n-# I looked only at {used}; not used: {others}."
MORE_NOT_USED = "{names} and {count} more"

# The note stays one short line however many files came and however long their names are.
_NOTE_NAMES = 3
_NOTE_NAME_LENGTH = 40

_MENTION = re.compile(r"<@!?(\d+)>")


@dataclass(frozen=True)
class PickedImage:
    """The image a question is about, whether it was sent as a spoiler, and a note on the files not used."""

    image: ImageRef
    spoiler: bool
    note: str


class ChatCog(commands.Cog):
    """Answers questions about images in channels, threads and DMs."""

    def __init__(self, bot: LlavaBot) -> None:
        self.bot = bot
        chat = bot.config.chat
        self.limits = ImageLimits(max_bytes=chat.max_image_bytes, max_pixels=chat.max_image_pixels)
        self._tasks: set[asyncio.Task[object]] = set()
        self.gate = QuestionGate(bot)
        self.arrivals = ArrivalOrder()

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
        # Taken before the first await, so in the order the gateway delivered the person's messages.
        arrival = self.arrivals.arrive(message.author.id)
        handed_over = False
        try:
            if not await self.is_addressed(message) or not await self.gate.admit_message(message):
                return
            if not self.bot.answers.accepting:
                await self.say(message, RESTARTING)
                return
            # Each question runs as its own task so that a long answer never holds up the gateway.
            task = asyncio.create_task(self.handle_message(message, arrival), name=f"answer-{message.id}")
            handed_over = True
        finally:
            if not handed_over:
                arrival.leave()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.bot.answers.add(task)

    def question_text(self, content: str) -> str:
        """The question without the bot's mention."""
        me = self.bot.user
        text = _MENTION.sub(lambda m: "" if me is not None and int(m.group(1)) == me.id else m.group(0), content)
        return text.strip()

    async def handle_message(self, message: discord.Message, arrival: Arrival | None = None) -> None:
        """Turn a Discord message into a question and stream the answer as a reply.

        ``arrival`` is the message's place in its author's line, left however the message ends.
        """
        try:
            await self._handle_message(message, arrival)
        finally:
            if arrival is not None:
                arrival.leave()

    async def _handle_message(self, message: discord.Message, arrival: Arrival | None) -> None:
        attachments: Sequence[discord.Attachment] = message.attachments
        if not attachments:
            replied = await self.replied_to(message)
            if replied is not None and self.withheld(replied):
                log.info("Message %s replies to %s, which Discord hides from the bot", message.id, replied.id)
                await self.say(message, REPLIED_HIDDEN)
                return
            attachments = replied.attachments if replied is not None else []
        sink = TrackedSink(MessageReplySink(message), self.bot.replies, message.channel.id)
        try:
            picked = await self.pick_image(attachments)
        except ImageRejected as error:
            log.info("Rejected the attachments of %s in %s: %s", message.author.id, message.channel.id, error)
            await self.say(message, str(error))
            return
        text = self.question_text(message.content)
        if not text and picked is None:
            await self.say(message, self.nothing_to_answer(message))
            return
        question = Question(
            channel_id=message.channel.id,
            author_id=message.author.id,
            author_name=message.author.display_name,
            text=text or DEFAULT_QUESTION,
            image=picked.image if picked else None,
            message_id=message.id,
            note=picked.note if picked else "",
            arrival=arrival,
        )
        try:
            await self.answer(question, sink, spoiler=picked is not None and picked.spoiler)
        except discord.HTTPException:
            log.exception("Could not reply in channel %s", message.channel.id)

    async def replied_to(self, message: discord.Message) -> discord.Message | None:
        """The message that ``message`` replies to, unless it is the bot's own or can't be had."""
        reference = message.reference
        if reference is None or reference.message_id is None or reference.type != discord.MessageReferenceType.reply:
            return None
        replied = reference.resolved or reference.cached_message
        if replied is None:
            # Discord left it out of the event (it does under load); the channel still has it.
            try:
                replied = await message.channel.fetch_message(reference.message_id)
            except discord.HTTPException as error:
                log.info("Could not fetch message %s replied to by %s: %s", reference.message_id, message.id, error)
                return None
        if not isinstance(replied, discord.Message):  # deleted since
            return None
        me = self.bot.user
        return None if me is not None and replied.author.id == me.id else replied

    def withheld(self, replied: discord.Message) -> bool:
        """Whether Discord hid the content and attachments of ``replied`` from the bot.

        Without the Message Content intent, a server message shows them only to the bots it mentions.
        """
        me = self.bot.user
        if self.bot.intents.message_content or replied.guild is None or me is None:
            return False
        return not any(user.id == me.id for user in replied.mentions)

    async def answer(self, question: Question, sink: TrackedSink[discord.Message], *, spoiler: bool = False) -> None:
        """Stream the answer into ``sink``; the reply's record is closed however the answer ends."""
        try:
            await self.bot.chat.answer(question, self.streamer(sink, spoiler=spoiler))
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
        self,
        sink: MessageReplySink | InteractionSink | TrackedSink[discord.Message],
        *,
        spoiler: bool = False,
    ) -> ReplyStreamer[discord.Message]:
        """The streamer of one reply; an answer about a spoilered image stays inside spoiler tags."""
        kind = SpoilerStreamer if spoiler else ReplyStreamer
        return kind(sink, edit_interval=self.bot.config.discord.edit_interval)

    async def pick_image(self, attachments: Sequence[discord.Attachment]) -> PickedImage | None:
        """The first attachment that is a usable image, checked by its content.

        The model answers about one image; other attachments are skipped and named in the note. Files
        that Discord says are not images are not downloaded. Raises ImageRejected, with the sentence
        for the person, only when there were attachments and none of them is a usable image.
        """
        rejections: list[ImageRejected] = []
        for attachment in attachments:
            if attachment.content_type is not None and not attachment.content_type.startswith("image/"):
                continue
            try:
                prepared = await self.prepare(attachment)
            except ImageRejected as error:
                log.info("Skipped attachment %s (%s): %s", attachment.id, attachment.filename, error)
                rejections.append(error)
                continue
            others = [a.filename for a in attachments if a.id != attachment.id]
            return PickedImage(prepared, attachment.is_spoiler(), _not_used_note(attachment.filename, others))
        if not attachments:
            return None
        # "Too large" or "damaged" tells the person more than "not an image" about a file meant as one.
        telling = [error for error in rejections if str(error) != NOT_AN_IMAGE]
        raise (telling or rejections or [ImageRejected(NOT_AN_IMAGE)])[0]

    async def prepare(self, attachment: discord.Attachment) -> ImageRef:
        """Download one attachment and check it; raises ImageRejected with the reason."""
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
        refusal = await self.gate.refuse_interaction(interaction)
        if refusal is not None:
            await interaction.response.send_message(refusal, ephemeral=True, allowed_mentions=NO_PINGS)
            return
        await interaction.response.defer(thinking=True)
        if not self.bot.answers.accepting:
            await interaction.edit_original_response(content=RESTARTING, allowed_mentions=NO_PINGS)
            return
        try:
            picked = await self.pick_image([image] if image else [])
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
            image=picked.image if picked else None,
        )
        # Tracked like the answers to messages, so that shutting down ends this reply with a sentence too.
        webhook = Interaction(interaction.application_id, interaction.token)
        sink = TrackedSink(InteractionSink(interaction), self.bot.replies, channel_id, interaction=webhook)
        spoiler = bool(picked and picked.spoiler)
        task = asyncio.create_task(self.answer(asked, sink, spoiler=spoiler), name=f"ask-{interaction.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.bot.answers.add(task)
        await task


def _not_used_note(used: str, others: Sequence[str]) -> str:
    """One line naming the attachments that were not looked at ("" when there were none)."""
    if not others:
        return ""

    def name(filename: str) -> str:
        short = filename if len(filename) <= _NOTE_NAME_LENGTH else filename[: _NOTE_NAME_LENGTH - 1] + "…"
        return discord.utils.escape_markdown(short)

    listed = ", ".join(name(other) for other in others[:_NOTE_NAMES])
    if len(others) > _NOTE_NAMES:
        listed = MORE_NOT_USED.format(names=listed, count=len(others) - _NOTE_NAMES)
    return NOT_USED_NOTE.format(used=name(used), others=listed)


async def setup(bot: LlavaBot) -> None:
    """Load the cog (discord.py extension entry point)."""
    await bot.add_cog(ChatCog(bot))
