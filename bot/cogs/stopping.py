"""Stopping an answer from Discord: the Stop button on a reply being written, and deleted messages.

Discord tells the bot about deletions with raw events, which arrive without the message cache and without
the Message Content intent. This cog only maps those events and button presses to the chat service,
which knows which answer a message belongs to (see :mod:`bot.chat.stopping`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands

from bot.chat.stopping import RunningAnswer, StopReason

if TYPE_CHECKING:
    from bot.client import LlavaBot

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
STOP_LABEL = "Stop"
NOT_YOURS = "Only the person who asked, or the bot's admins, can stop this answer."

STOP_ID = "llava-bot:stop"


class StopButton(discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=re.escape(STOP_ID)):
    """The Stop button. As a dynamic item it needs no view kept per message; presses are handled by
    :meth:`StopCog.on_interaction`, which finds the answer by the message the button sits on, even when
    that message was finished a moment before (a long answer moved on to its next message)."""

    def __init__(self) -> None:
        super().__init__(
            discord.ui.Button(label=STOP_LABEL, emoji="⏹️", style=discord.ButtonStyle.secondary, custom_id=STOP_ID)
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> StopButton:
        return cls()

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Nothing: the press was already handled by :meth:`StopCog.on_interaction`."""


def stop_view() -> discord.ui.View:
    """A view holding only the Stop button, for a reply while its answer is written."""
    view = discord.ui.View(timeout=None)
    view.add_item(StopButton())
    return view


class StopCog(commands.Cog):
    """Stops answers: by their Stop button, or because their reply or question was deleted."""

    def __init__(self, bot: LlavaBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(StopButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(StopButton)

    async def may_stop(self, user: discord.abc.User, asker_id: int) -> bool:
        """The person who asked, and the bot's admins (the same people who may use /precision)."""
        if user.id == asker_id or user.id in self.bot.config.discord.admin_ids:
            return True
        return await self.bot.is_owner(user)

    def running_for(self, message: discord.Message) -> RunningAnswer | None:
        """The answer whose reply ``message`` is part of, if it is still being written.

        The first message of a reply to a mention is also found by the question it replies to: a press can
        reach the bot before Discord's answer to posting that message does.
        """
        running = self.bot.chat.running
        found = running.find(message.id)
        reference = message.reference
        if found is None and reference is not None and reference.message_id is not None:
            found = running.find(reference.message_id)
        return found

    async def stop_pressed(self, interaction: discord.Interaction[Any]) -> None:
        """Stop the answer whose reply carries the pressed button, if the presser may."""
        message = interaction.message
        running = self.running_for(message) if message is not None else None
        if running is None:
            # The answer already ended but its button stayed (a failed last edit, a restart): tidy up.
            log.info("Stop pressed on message %s, whose answer has ended", message.id if message else "?")
            await interaction.response.edit_message(view=None)
            return
        if not await self.may_stop(interaction.user, running.author_id):
            log.info("User %s may not stop the answer to %s", interaction.user.id, running.author_id)
            await interaction.response.send_message(NOT_YOURS, ephemeral=True)
            return
        # Acknowledge without changing the message: the answer's own closing edit shows the note.
        await interaction.response.defer()
        running.stop(StopReason.STOPPED)

    @commands.Cog.listener()
    async def on_interaction(self, interaction: discord.Interaction[Any]) -> None:
        data: Mapping[str, Any] = interaction.data or {}
        if interaction.type is discord.InteractionType.component and data.get("custom_id") == STOP_ID:
            await self.stop_pressed(interaction)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self.deleted([payload.message_id])

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await self.deleted(sorted(payload.message_ids))

    async def deleted(self, message_ids: list[int]) -> None:
        """Hand deleted messages to the chat service; a failure is logged, never raised into the gateway."""
        results = await asyncio.gather(
            *(self.bot.chat.message_deleted(message_id) for message_id in message_ids), return_exceptions=True
        )
        for message_id, result in zip(message_ids, results, strict=True):
            if isinstance(result, BaseException):
                log.error("Handling the deletion of message %s failed", message_id, exc_info=result)


async def setup(bot: LlavaBot) -> None:
    """Load the cog (discord.py extension entry point)."""
    await bot.add_cog(StopCog(bot))
