"""Close the replies that a process which ended left half-written (a crash, kill -9, a power cut).

Such a reply still shows the "still writing" marker, or a "Thinking…" placeholder, and would forever. Each is
edited to end with a sentence saying the answer was cut off, then taken off the record. Several processes may
share the database (shards, PostgreSQL): a reply is closed only once the process writing it has ended, which
a start checks at once and every running process checks again every ``discord.recovery_interval`` seconds, so the
survivors close what a crashed peer left within the claims' expiry (:data:`~bot.store.shared.QUESTION_TTL`).

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
from bot.store.replies import StoredReply, abandoned
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
    """Closes the replies that ended processes left open: at start, then every ``discord.recovery_interval``."""

    def __init__(self, bot: LlavaBot) -> None:
        self.bot = bot
        self._task: asyncio.Task[None] | None = None
        # Replies taken over but not closed yet (Discord failed for now): tried again at the next sweep.
        self._pending: dict[int, StoredReply] = {}

    async def cog_load(self) -> None:
        self._task = asyncio.create_task(self.watch(), name="close-orphaned-replies")

    async def cog_unload(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def watch(self) -> None:
        """Sweep now and then every ``discord.recovery_interval`` seconds; a failed sweep is logged and retried."""
        starting = True
        while True:
            try:
                await self.sweep(starting=starting)
            except Exception:
                log.exception("Looking for unfinished replies of ended processes failed")
            starting = False
            # One small query a look; a crashed process of this host is noticed at the next one.
            await asyncio.sleep(self.bot.config.discord.recovery_interval)

    async def sweep(self, *, starting: bool = False) -> int:
        """Take over the replies of processes that have ended and close them; returns how many were closed."""
        replies = self.bot.replies
        others = await replies.of_others()
        now = utcnow()
        orphans = [reply for reply in others if abandoned(reply, now)]
        if starting and len(others) > len(orphans):
            log.info("Leaving %d open replies to the running processes writing them", len(others) - len(orphans))
        adopted = [reply for reply in orphans if await replies.adopt(reply)]
        if adopted:
            log.info("%d replies were left unfinished by processes that ended; closing them", len(adopted))
        self._pending.update((reply.id, reply) for reply in adopted)
        return await self.close_all(list(self._pending.values()))

    async def close_all(self, orphans: list[StoredReply]) -> int:
        """Close each reply in turn; one that fails is logged and does not hold up the others."""
        closed = 0
        for reply in orphans:
            where = f"reply {reply.id} in channel {reply.channel_id}"
            try:
                await self.close_reply(reply)
            except (discord.Forbidden, discord.NotFound) as error:
                # Not ours to reach any more (permissions, a deleted channel): retrying would not help.
                log.warning("Could not close the unfinished %s: %s; giving up on it", where, error)
            except (discord.HTTPException, aiohttp.ClientError, OSError) as error:
                log.warning("Could not close the unfinished %s: %s; trying again soon", where, error)
                continue
            except Exception:
                # Left on record under this process: the next start, or a survivor of this one, tries again.
                log.exception("Closing the unfinished %s failed", where)
                self._pending.pop(reply.id, None)
                continue
            self._pending.pop(reply.id, None)
            closed += 1
            try:
                await self.bot.replies.close(reply.id)
            except Exception:
                log.exception("Could not mark the %s as closed", where)
        return closed

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
