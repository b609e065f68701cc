"""At start, close the replies that the previous process left half-written (a crash, kill -9, a power cut).

Such a reply still shows the "still writing" marker, or a "Thinking…" placeholder, and would forever. Each is
edited to end with a sentence saying the answer was cut off, then taken off the record.

Regular replies are edited through the channel, like any message of the bot's own. Responses to /ask are
edited through the interaction's webhook while its token lives (15 minutes, which also works where the bot
cannot read the channel); after that through the channel, which Discord allows for the bot's own
non-ephemeral interaction responses. A reply that can be reached neither way is logged and let go.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

import aiohttp
import discord
from discord.ext import commands

from bot.chat.service import THINKING, WAITING
from bot.chat.streaming import DEFAULT_MARKER, FAILURE_LINE
from bot.cogs.replies import NO_PINGS
from bot.store.replies import StoredReply
from bot.store.tables import utcnow

if TYPE_CHECKING:
    from bot.client import LlavaBot

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
CUT_OFF = "This answer was cut off when I restarted; please ask again."

MESSAGE_LIMIT = 2000
# An interaction token lives 15 minutes from the interaction; the reply was recorded a little after it.
TOKEN_LIFETIME = timedelta(minutes=14)
_WAITING_PREFIX = WAITING.split("{", 1)[0]


def closed_content(content: str, *, last: bool) -> str | None:
    """What a message left open should show instead, or None if it needs no change.

    A message showing the marker was cut off mid-answer; the last message may still show the placeholder
    of an answer that had not begun. A message without either already shows its final text.
    """
    if content.endswith(DEFAULT_MARKER):
        text = content.removesuffix(DEFAULT_MARKER)
        return text + FAILURE_LINE.format(sentence=CUT_OFF) if text.strip() else CUT_OFF
    if last and (content == THINKING or content.startswith(_WAITING_PREFIX)):
        return CUT_OFF
    return None


class _Target:
    """Reads and edits one reply's messages, through the interaction's webhook or the channel."""

    def __init__(self, bot: LlavaBot, reply: StoredReply) -> None:
        self.channel = bot.get_partial_messageable(reply.channel_id)
        self.webhook: discord.Webhook | None = None
        interaction = reply.interaction
        if interaction is not None and utcnow() - reply.created_at < TOKEN_LIFETIME:
            self.webhook = discord.Webhook.partial(interaction.application_id, interaction.token, client=bot)

    async def content(self, message_id: int) -> str | None:
        """The message's text, or None if it is gone."""
        if self.webhook is not None:
            try:
                return (await self.webhook.fetch_message(message_id)).content
            except discord.NotFound:
                return None
            except discord.HTTPException as error:
                log.info("The interaction's webhook no longer works (%s); using the channel", error)
                self.webhook = None
        try:
            return (await self.channel.fetch_message(message_id)).content
        except discord.NotFound:
            return None

    async def edit(self, message_id: int, content: str) -> None:
        # view=None: a Stop button left on a reply a crash interrupted has nothing left to stop.
        if self.webhook is not None:
            await self.webhook.edit_message(message_id, content=content, allowed_mentions=NO_PINGS, view=None)
        else:
            message = self.channel.get_partial_message(message_id)
            await message.edit(content=content, allowed_mentions=NO_PINGS, view=None)

    async def add_line(self, message_id: int, line: str) -> None:
        """A sentence that no longer fits into the message goes below it, as a reply to it."""
        reference = self.channel.get_partial_message(message_id)
        try:
            await self.channel.send(line, reference=reference, mention_author=False, allowed_mentions=NO_PINGS)
        except discord.HTTPException:
            if self.webhook is None:
                raise
            await self.webhook.send(line, allowed_mentions=NO_PINGS)


class RecoveryCog(commands.Cog):
    """Closes the replies a previous process left open, in the background of the start."""

    def __init__(self, bot: LlavaBot) -> None:
        self.bot = bot
        self._task: asyncio.Task[None] | None = None

    async def cog_load(self) -> None:
        # Read now, before this process records replies of its own.
        orphans = await self.bot.replies.open_replies()
        if orphans:
            log.info("%d replies were left unfinished by the previous run; closing them", len(orphans))
            self._task = asyncio.create_task(self.close_all(orphans), name="close-orphaned-replies")

    async def cog_unload(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def close_all(self, orphans: list[StoredReply]) -> None:
        """Close each reply in turn; one that fails is logged and does not hold up the others."""
        for reply in orphans:
            where = f"reply {reply.id} in channel {reply.channel_id}"
            try:
                await self.close_reply(reply)
            except (discord.Forbidden, discord.NotFound) as error:
                # Not ours to reach any more (permissions, a deleted channel): retrying would not help.
                log.warning("Could not close the unfinished %s: %s; giving up on it", where, error)
            except (discord.HTTPException, aiohttp.ClientError, OSError) as error:
                log.warning("Could not close the unfinished %s: %s; trying again at the next start", where, error)
                continue
            except Exception:
                log.exception("Closing the unfinished %s failed", where)
                continue
            try:
                await self.bot.replies.close(reply.id)
            except Exception:
                log.exception("Could not mark the %s as closed", where)

    async def close_reply(self, reply: StoredReply) -> None:
        """Edit the reply's messages so that none still looks as if it were being written."""
        target = _Target(self.bot, reply)
        for index, message_id in enumerate(reply.message_ids):
            content = await target.content(message_id)
            if content is None:
                continue  # deleted meanwhile: nothing left to close
            wanted = closed_content(content, last=index == len(reply.message_ids) - 1)
            if wanted is None:
                continue
            if len(wanted) <= MESSAGE_LIMIT:
                await target.edit(message_id, wanted)
            else:
                await target.edit(message_id, content.removesuffix(DEFAULT_MARKER))
                await target.add_line(message_id, FAILURE_LINE.format(sentence=CUT_OFF).lstrip())
            log.info("Closed message %s of an unfinished reply in channel %s", message_id, reply.channel_id)


async def setup(bot: LlavaBot) -> None:
    """Load the cog (discord.py extension entry point)."""
    await bot.add_cog(RecoveryCog(bot))
